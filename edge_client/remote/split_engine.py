"""The dlora way to compute a step: embedding, head, loss and LoRA on this device, the frozen decoder
blocks on dlora-cloud over one gRPC session. Same interface as train.engines.LocalEngine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from common.config import KillMode, TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.scheduler import Decision
from edge_client.remote.link import CloudLink, LinkConfig
from edge_client.remote.remote_step import MicroBatch, RemoteStep
from edge_client.train.data import Batch, lm_loss
from edge_client.train.engines import Traffic
from edge_client.train.kill_revive import kr_config
from edge_client.train.lora import LoraAdapter
from edge_client.train.model_parts import EdgeModel
from edge_client.train.privacy import PrivacyNoise


class SplitEngine:
    """Edge half of split training; `roles` says per layer what this step does with its LoRA group."""

    def __init__(self, cfg: TrainConfig, edge: EdgeModel | None = None, token: str | None = None) -> None:
        """token: the device token for a cloud that requires one (read by the entry point)."""
        self.edge = edge or EdgeModel(cfg.model, cfg.targets, cfg.device, cfg.edge_layers)
        self.tokenizer = self.edge.tokenizer
        self.num_layers = self.edge.num_layers
        self.adapter = LoraAdapter(self.edge, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.seed)
        self.link = CloudLink(LinkConfig.from_train(cfg, token), self.edge, kr_config(cfg, self.num_layers),
                              lora=self.adapter)
        self.link.open()
        self.micro_batches = cfg.micro_batches
        self.privacy = PrivacyNoise.from_config(cfg)  # --privacy-noise, --grad-noise: off by default
        # computes micro-batches' heads while the step's thread answers the others' layer calls (M > 1);
        # one long-lived thread: a fresh thread per step would start a new OpenMP team each time
        self._heads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlora-head")

    @property
    def session_id(self) -> str:
        return self.link.session_id

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.adapter.named_lora_parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.adapter.named_lora_parameters()

    def scheduler_state(self) -> str | None:
        return None  # the cloud keeps it, under the session id

    def resume(self, session_id: str, scheduler_state: str | None) -> None:
        """Continue the checkpoint's cloud session (its Kill-and-Revive state lives there)."""
        if session_id and session_id != self.link.session_id:
            self.link.session_id = session_id
            self.link.open()

    def params_by_layer(self) -> dict[int, list[nn.Parameter]]:
        out: dict[int, list[nn.Parameter]] = {}
        for t, pair in zip(self.adapter.targets, self.adapter.pairs):
            out.setdefault(t.layer, []).extend([pair.A, pair.B])
        return out

    def set_active(self, active: set[int], mode: KillMode) -> None:
        """Killed modules get no weight gradients (their optimizer state stays); the roles do the rest."""
        for t, pair in zip(self.adapter.targets, self.adapter.pairs):
            pair.requires_grad_(t.layer in active)

    def report_epoch(self, epoch: int, deltas: dict[int, float]) -> Decision:
        """The cloud's scheduler decides."""
        return self.link.report_epoch(epoch, deltas)

    def train_step(self, batch: Batch, step: int, roles: list[int]) -> tuple[float, Traffic]:
        """One optimizer step's loss and LoRA gradients, as `micro_batches` overlapped micro-batches.

        Raises:
            RemoteError, ProtocolError: as RemoteStep.run.
        """
        n_tokens = batch.label_tokens  # the whole batch's: micro-batch losses add up to its mean
        parts: list[MicroBatch] = []
        labels: list[torch.Tensor] = []
        dev = self.edge.device
        for mb, part in enumerate(batch.split(self.micro_batches)):
            up = self._up(part, step, mb, roles)  # (b, t, E), or (b, t, H) after the edge layers
            # noised in the graph: InputGrad reaches the edge's blocks through the clipping's own Jacobian
            x = self.privacy.inputs(up, part.attention_mask, step, mb)
            parts.append(MicroBatch(x.detach(), part.attention_mask, source=x if x.requires_grad else None))
            labels.append(part.labels.to(dev))
        losses: dict[int, float] = {}

        def head(mb: int, h: torch.Tensor) -> torch.Tensor:
            h = h.detach().requires_grad_(True)  # (b, t, E_out)
            loss = lm_loss(self.edge.logits(h), labels[mb], n_tokens)
            loss.backward()
            losses[mb] = float(loss.detach())
            return self.privacy.hidden_grad(h.grad, parts[mb].attention_mask, labels[mb], step, mb)  # type: ignore[arg-type]

        traffic = RemoteStep(self.link, self.adapter, step=step, roles=roles, train=True, head=head,
                             heads=self._heads).run(parts)
        return sum(losses[mb] for mb in sorted(losses)), traffic

    def _up(self, part: Batch, step: int, mb: int, roles: list[int]) -> torch.Tensor:
        """The tensor micro-batch `mb`'s StepBegin carries (before any noise), computed here and only here: the
        input embeddings, or with --edge-layers k the hidden states after block k-1, with the autograd graph of
        the edge's blocks when one of them takes part in backward (InputGrad is backpropagated from it)."""
        trains = pb.FORWARD_BACKWARD in roles[: self.edge.edge_layers]
        dev = self.edge.device
        with torch.set_grad_enabled(trains):
            return self.edge.up(part.input_ids.to(dev), part.attention_mask.to(dev), self.adapter, roles, (step, mb))

    def recover(self) -> None:
        """Reconnect after a broken stream, resuming the same cloud session id."""
        self.link.open()

    def save(self, out_dir: Path) -> None:
        self.adapter.save(out_dir)

    def close(self) -> None:
        self.link.close()
        self._heads.shutdown(wait=True)
