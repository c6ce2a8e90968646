"""One `dlora bench` configuration in a process of its own: `python -m edge_client.tools.bench_worker SPEC_JSON`.

A fresh process per configuration makes its CPU time and peak RSS its own. The worker sets up (model,
engine, the same seeded batches and LoRA weights as every other configuration), takes one warm-up
step, then obeys "step" / "finish" lines on stdin, answering on stdout; `Worker` is the parent's
handle on it, `run_worker` steps one back to back, `run_paired` steps local-train and a split
configuration in turn. This module imports torch only inside the worker, after process tuning.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from common.config import Device, Dtype, KillMode, StepProtocolName, TrainConfig, WeightCodec, field_default
from common.errors import ConfigError
from common.families import family_of
from common.tuning import tune_process

if TYPE_CHECKING:
    from edge_client.train.data import Batch


class BenchSpec(BaseModel):
    """One bench configuration, as the command hands it to a worker process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path  # model folder
    name: str = "worker"  # names the configuration in errors
    cloud: str | None = None  # HOST:PORT of dlora-cloud: a split configuration; None: local-train
    wire: str = field_default(TrainConfig, "wire")  # a codec, or UP/DOWN ("int8/bfloat16"): one per direction
    int8_block_size: int = field_default(TrainConfig, "int8_block_size")
    targets: tuple[str, ...] | None = None  # None: attention_targets of the model's family
    budget: int | None = Field(None, ge=1)  # active modules, spread evenly over the stack; None (or >= the layers): all
    kill_mode: KillMode = field_default(TrainConfig, "kill_mode")
    micro_batches: int = field_default(TrainConfig, "micro_batches")
    protocol: StepProtocolName = field_default(TrainConfig, "protocol")
    weights_wire: WeightCodec = field_default(TrainConfig, "weights_wire")
    steps: int = 6  # timed steps, after one warm-up step
    batch_size: int = 8
    seq_len: int = 128
    device: Device = field_default(TrainConfig, "device")  # the device side's (and local-train's) compute
    local_dtype: Dtype = field_default(TrainConfig, "dtype")  # local-train's frozen base
    tls_ca: Path | None = None  # the CA of the bench cloud's certificate (--tls): train over TLS; None: plaintext


def attention_targets(model_type: str) -> tuple[str, ...]:
    """The bench's default LoRA targets: the modules that read the attention's input, i.e. q, k and v
    (LLaMA, Mistral, Qwen2, OPT) or their fused projection (BLOOM, GPT-NeoX: query_key_value; GPT-2: c_attn).

    Raises:
        ConfigError: the architecture is not supported.
    """
    return tuple(path.rsplit(".", 1)[-1] for path in family_of(model_type).input_groups[0])


def spread(budget: int, layers: int) -> set[int]:
    """`budget` layer indices spread evenly over the stack, the top layer included."""
    return {layers - 1 - round(i * layers / budget) for i in range(budget)}


def synthetic_batches(n: int, batch: int, seq: int, vocab: int, seed: int) -> list[Batch]:
    import torch

    from edge_client.train.data import Batch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        out.append(Batch(ids, torch.ones_like(ids), ids.clone()))
    return out


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM). ru_maxrss would include the parent's RSS at fork time,
    which Linux carries across exec."""
    import resource

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BenchRun:
    """One configuration's training, in this (fresh) process, one optimizer step at a time: the trainer's
    optimizer_step on the engine `dlora train` or `dlora local-train` would use, with a fixed AdamW."""

    def __init__(self, spec: BenchSpec) -> None:
        import torch

        from common.model_files import load_config
        from edge_client.remote.split_engine import SplitEngine
        from edge_client.train.engines import LocalEngine
        from edge_client.train.kill_revive import layer_roles

        up, _, down = spec.wire.partition("/")
        self.spec = spec
        self.cfg = cfg = TrainConfig(
            model=spec.model, data=Path("synthetic"), output=Path("unused"), cloud=spec.cloud,
            wire=up, wire_down=down or None, int8_block_size=spec.int8_block_size,
            targets=spec.targets or attention_targets(load_config(spec.model).model_type),
            lora_dropout=0.0, lr=1e-3, micro_batches=spec.micro_batches, progress=False, reply_timeout_s=1200,
            protocol=spec.protocol, weights_wire=spec.weights_wire,
            device=spec.device, dtype=spec.local_dtype, tls_ca=spec.tls_ca)
        self.engine = engine = SplitEngine(cfg) if cfg.cloud else LocalEngine(cfg)
        layers = engine.num_layers
        budget = layers if spec.budget is None else min(spec.budget, layers)
        self.active = spread(budget, layers) if budget < layers else set(range(layers))
        engine.set_active(self.active, spec.kill_mode)
        self.roles = layer_roles(self.active, layers, spec.kill_mode)
        self.opt = torch.optim.AdamW(engine.parameters(), lr=cfg.lr)
        vocab = int(engine.edge.config.vocab_size)
        self.batches = synthetic_batches(spec.steps + 1, spec.batch_size, spec.seq_len, vocab, seed=0)
        self.next = 0
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.payload: list[int] = []
        self.wire: list[int] = []
        self.loss = 0.0

    def step(self) -> float:
        """Train on the next batch; its wall seconds. Step 0 is the warm-up (allocator, gRPC channel, lazy
        inits) and is not recorded."""
        import torch

        from edge_client.train.trainer import optimizer_step

        t0, c0 = time.perf_counter(), time.process_time()
        self.loss, traffic = optimizer_step(self.engine, self.opt, self.batches[self.next], self.next, self.roles)
        if self.cfg.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if self.next > 0:
            self.times.append(seconds)
            self.cpu.append(time.process_time() - c0)
            self.payload.append(traffic.payload_up + traffic.payload_down)
            self.wire.append(traffic.bytes_up + traffic.bytes_down)
        self.next += 1
        return seconds

    @property
    def remaining(self) -> int:
        return len(self.batches) - self.next

    def formula(self) -> int:
        """Payload bytes of one timed step by the formula of the configuration's protocol (common/wire/cost.py),
        micro-batch by micro-batch (each int8 tensor carries its own block scales).

        Adapter: after the warm-up step the cloud holds every killed module's unchanged weights, so a
        timed step sends exactly the trained modules' weights and gets their gradients back.
        """
        from common.wire.cost import adapter_step_cost, step_cost

        edge, spec, cfg = self.engine.edge, self.spec, self.cfg
        parts = [p.attention_mask.numel() for p in self.batches[1].split(spec.micro_batches)]
        if spec.protocol == "adapter":
            layout = self.engine.adapter.layout  # type: ignore[attr-defined]
            numel = layout.total_numel([layout.module(layer, t) for layer in self.active for t in range(layout.per_layer)])
            cost = adapter_step_cost(parts, edge.embed_width, edge.head_width, numel, numel, True, cfg.codec_up,
                                     cfg.int8_block_size, cfg.codec_down, cfg.weights_wire)  # sent = trained
            return cost.up + cost.down
        costs = [step_cost(n, edge.embed_width, edge.head_width, edge.group_shapes(), self.roles, True, cfg.codec_up,
                           cfg.int8_block_size, cfg.codec_down) for n in parts]
        return sum(c.up + c.down for c in costs)

    def result(self) -> dict[str, Any]:
        self.engine.close()
        split = self.cfg.cloud is not None
        return {
            "median_step_s": statistics.median(self.times), "step_s": self.times,
            "cpu_s_per_step": statistics.mean(self.cpu), "peak_rss_mb": peak_rss_mb(), "final_loss": self.loss,
            "payload_per_step": statistics.mean(self.payload) if split else 0,
            "formula_per_step": self.formula() if split else 0,
            "wire_per_step": statistics.mean(self.wire) if split else 0,
            "active": len(self.active), "layers": len(self.roles),
        }


_SETTLE_S = 0.1  # between two workers' steps: the idle one's OpenMP threads stop spinning (libgomp's default: ~8 ms)
_REPLY = "dlora-bench "  # marks the worker's protocol lines on its stdout


def serve_worker(spec: BenchSpec) -> None:
    """The worker process: set up, take the warm-up step, then obey "step" / "finish" lines on stdin."""
    run = BenchRun(spec)
    run.step()
    print(_REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step" and run.remaining:
            print(_REPLY + json.dumps({"step_s": run.step()}), flush=True)
        elif line.strip() == "finish":
            print(_REPLY + json.dumps(run.result()), flush=True)
            return
        else:  # the parent reads the last stderr line as the reason
            sys.exit(f"bench worker: cannot do {line.strip()!r} ({run.remaining} batches left)")


class Worker:
    """One configuration in a fresh process (so its CPU time and peak RSS are its own), stepped from here.
    `spec`: a BenchSpec or a dict of its fields.

    Raises:
        ConfigError: the worker failed (its last stderr line says why).
    """

    def __init__(self, spec: BenchSpec | Mapping[str, Any]) -> None:
        spec = BenchSpec.model_validate(spec)
        self.name = spec.name
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "edge_client.tools.bench_worker", spec.model_dump_json()],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._stdin, self._stdout = self._proc.stdin, self._proc.stdout  # both set: PIPE

    def _ask(self, command: str | None) -> dict[str, Any]:
        try:
            if command is not None:
                self._stdin.write(command + "\n")  # type: ignore[union-attr]
                self._stdin.flush()  # type: ignore[union-attr]
            while line := self._stdout.readline():  # type: ignore[union-attr]
                if line.startswith(_REPLY):
                    return json.loads(line[len(_REPLY):])  # type: ignore[no-any-return]
        except BrokenPipeError:
            pass
        self._proc.wait()
        self._stderr.seek(0)
        last = (self._stderr.read().strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"bench configuration {self.name} failed: {last}")

    def ready(self) -> None:
        """Wait until the worker has set up and taken its warm-up step."""
        self._ask(None)

    def step(self) -> float:
        return float(self._ask("step")["step_s"])

    def finish(self) -> dict[str, Any]:
        result = self._ask("finish")
        self._proc.wait()
        self._stderr.close()
        return result

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def run_worker(spec: BenchSpec | Mapping[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process, its steps back to back; its result dict.

    Raises:
        ConfigError: the worker failed (its last stderr line says why).
    """
    spec = BenchSpec.model_validate(spec)
    worker = Worker(spec)
    try:
        worker.ready()
        for _ in range(spec.steps):
            worker.step()
        return worker.finish()
    finally:
        worker.kill()


def run_paired(local_spec: BenchSpec | Mapping[str, Any], spec: BenchSpec | Mapping[str, Any],
               on_step: Callable[[], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """local-train and one split configuration in two fresh processes, taking their steps in turn.

    On a shared machine the speed of the cores drifts by tens of percent within seconds; steps taken
    in alternation see the same drift, so their ratio holds where back-to-back runs do not.

    Raises:
        ConfigError: a worker failed.
    """
    spec = BenchSpec.model_validate(spec)
    local, split = Worker(local_spec), Worker(spec)
    try:
        local.ready()
        split.ready()
        for i in range(spec.steps):
            for worker in (local, split) if i % 2 == 0 else (split, local):
                time.sleep(_SETTLE_S)
                worker.step()
            if on_step is not None:
                on_step()
        return local.finish(), split.finish()
    finally:
        local.kill()
        split.kill()


def main(argv: list[str] | None = None) -> None:
    tune_process()  # before anything imports torch: see common/tuning.py
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("use `dlora bench`")
    sys.setswitchinterval(float(os.environ.get("DLORA_GIL_SWITCH_S", "0.005")))
    serve_worker(BenchSpec.model_validate_json(argv[0]))
    sys.stderr.flush()
    # The result is out; skip the interpreter's teardown. In ~2% of runs here it aborted after the
    # result ("terminate called without an active exception", from a native thread at exit).
    os._exit(0)


if __name__ == "__main__":
    main()
