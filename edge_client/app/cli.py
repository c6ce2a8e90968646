"""`dlora`: the device-side command line (train, local-train, eval, prepare, demo).

Environment variables read here only: DLORA_CACHE (default cache folder), DLORA_LOG_LEVEL, DLORA_TOKEN (the
device token when --token-file is not given).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.config import (
    DEVICES,
    DTYPES,
    KILL_MODES,
    STEP_PROTOCOLS,
    WEIGHT_CODECS,
    ServeConfig,
    TrainConfig,
    check_int8_block_size,
    flag_error,
)
from common.errors import ConfigError, DloraError, RemoteError
from common.tls import add_client_flags, client_tls
from common.tuning import tune_process
from edge_client.app.control import COMMANDS as CONTROL_COMMANDS
from edge_client.app.control import add_control_commands, run_control
from edge_client.app.train_flags import default as _default
from edge_client.app.train_flags import (
    kill_revive_flags,
    lora_flags,
    privacy_flags,
    protocol_flags,
    wire_flags,
)
from edge_client.attack.flags import add_attack_flags
from edge_client.tools.bench_worker import BenchSpec

log = logging.getLogger("dlora")


def default_cache() -> Path:
    return Path(os.environ.get("DLORA_CACHE", Path.home() / ".cache" / "dlora"))


def _given(value: Any, name: str) -> Any:
    """A flag's value, or its config field's default where it was left unset (eval and bench have no config)."""
    return _default(name) if value is None else value


def _split_flags(p: argparse.ArgumentParser) -> None:
    """`dlora train`'s flags that local-train lacks: the cloud and the link to it."""
    p.add_argument("--cloud", required=True, metavar="HOST:PORT", help="address of `dlora-cloud serve`")
    add_client_flags(p)  # --tls-ca, --tls-cert, --tls-key
    wire_flags(p)
    protocol_flags(p)
    p.add_argument("--connect-timeout", type=float, default=None,
                   help=f"seconds to reach the cloud (default {_default('connect_timeout_s'):g})")
    p.add_argument("--reply-timeout", type=float, default=None,
                   help=f"longest wait for one cloud message (default {_default('reply_timeout_s'):g})")
    p.add_argument("--max-message-mb", type=int, default=None,
                   help=f"gRPC message size limit in MB (default {_default('max_message_mb')})")
    _token_flag(p)


def _token_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding this device's token, for a cloud that requires one (default: $DLORA_TOKEN; "
                        "never the token itself as a flag: it would show in ps)")


def _train_flags(p: argparse.ArgumentParser, split: bool) -> None:
    if split:
        _split_flags(p)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (config, tokenizer, safetensors)")
    p.add_argument("--data", required=True, type=Path, help='JSONL: {"text"} or {"prompt", "completion"} per line')
    p.add_argument("--output", required=True, type=Path, help="folder for the PEFT adapter and metrics.jsonl")
    lora_flags(p)
    p.add_argument("--micro-batches", type=int, default=None,
                   help="split each batch into M micro-batches: they overlap on the wire (train), they accumulate "
                        f"gradients (local-train); the same dropout masks either way (default {_default('micro_batches')})")
    kill_revive_flags(p)
    privacy_flags(p)  # local-train has them to refuse them with one line (it sends nothing up)
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, choices=DEVICES,
                   help="where this device computes (train: embedding, head, LoRA; local-train: the model) "
                        f"(default {_default('device')})")
    if not split:
        p.add_argument("--dtype", default=None, choices=DTYPES,
                       help=f"dtype of the frozen base model (default {_default('dtype')})")
    p.add_argument("--detach", action="store_true",
                   help="submit to the dlora-edge daemon and return; follow with `dlora status` / `dlora logs`")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cloud", required=True, metavar="HOST:PORT", help="address of `dlora-cloud serve`")
    add_client_flags(p)  # --tls-ca, --tls-cert, --tls-key
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    p.add_argument("--adapter", type=Path, default=None, help="PEFT adapter folder from `dlora train` (default: base model)")
    p.add_argument("--data", type=Path, default=None, help='JSONL: {"prompt", "choices", "answer"} per line')
    p.add_argument("--tasks", default=None,
                   help="prepared tasks instead of --data, e.g. piqa,arc_easy (their 75%% test splits); all = every task")
    p.add_argument("--cache-dir", type=Path, default=None, help="for --tasks: default $DLORA_CACHE or ~/.cache/dlora")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per scored sequence (default {_default('max_length')})")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    wire_flags(p)
    protocol_flags(p)
    _token_flag(p)


def _prepare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="smollm2-135m, a task (boolq, piqa, siqa, hellaswag, winogrande, openbookqa, "
                                "arc_easy, arc_challenge, sst2) or all")
    p.add_argument("--cache-dir", type=Path, default=None, help="default $DLORA_CACHE or ~/.cache/dlora")
    p.add_argument("--seed", type=int, default=0, help="seed of the 25%%/75%% train/test split (default 0)")


def _bench_flags(p: argparse.ArgumentParser) -> None:
    """Per-configuration defaults come from BenchSpec (steps, batch, length) and the process configs (the rest)."""
    spec = BenchSpec.model_fields
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (default: a LLaMA-shaped random-weight model, ~34M parameters)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per configuration, after one warm-up (default {spec['steps'].default})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {spec['batch_size'].default}")
    p.add_argument("--seq-len", type=int, default=None, help=f"default {spec['seq_len'].default}")
    p.add_argument("--wires", default="float32,bfloat16,int8",
                   help="codecs to measure; UP/DOWN for one per direction, e.g. int8/bfloat16 (default float32,bfloat16,int8)")
    p.add_argument("--int8-block-size", type=int, default=None,
                   help=f"int8: elements per absmax scale (default {_default('int8_block_size')})")
    p.add_argument("--targets", default=None,
                   help="LoRA target modules, comma-separated PEFT-style names (default: those reading the attention's "
                        "input: q_proj,k_proj,v_proj, or query_key_value / c_attn where q, k and v are fused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--budgets", default="all,L/2,L/4", help="active modules: all, L/N or a number (default all,L/2,L/4)")
    p.add_argument("--micro-batches", default=None,
                   help=f"comma-separated M values (default {_default('micro_batches')})")
    p.add_argument("--protocols", default=None,
                   help=f"comma-separated step protocols to measure, of {', '.join(STEP_PROTOCOLS)} "
                        f"(default {_default('protocol')})")
    p.add_argument("--weights-wire", default=None, choices=WEIGHT_CODECS,
                   help=f"adapter protocol: codec of the LoRA weights and their gradients (default {_default('weights_wire')})")
    p.add_argument("--kill-mode", default=None, choices=KILL_MODES, help=f"default {_default('kill_mode')}")
    p.add_argument("--wan", default=None, metavar="DELAY,RATE",
                   help="emulate a device link, e.g. 10ms,100mbit (one-way delay, rate each way) or 10ms,20mbit/100mbit "
                        "(uplink/downlink): kernel netem where the machine has it (root), else a user-space relay")
    p.add_argument("--shape", default="small", choices=["small", "llama-7b"],
                   help="default model when --model is not given: small (~34M, LLaMA-shaped) or llama-7b (random weights)")
    p.add_argument("--device", default=None, choices=DEVICES,
                   help=f"where the device side (and the local-train baseline) computes (default {_default('device')})")
    p.add_argument("--local-dtype", default=None, choices=DTYPES,
                   help=f"dtype of the local-train baseline's frozen model (default {_default('dtype')})")
    p.add_argument("--cloud-device", default=None, choices=DEVICES,
                   help=f"where the cloud runs (default {_default('device', ServeConfig)})")
    p.add_argument("--cloud-dtype", default=None, choices=DTYPES, help=f"default {_default('dtype', ServeConfig)}")
    p.add_argument("--tls", action="store_true", help="the bench's cloud serves TLS (a temporary `tls init` set): its cost")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown table here")


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="arc_easy", help="prepared task to fine-tune on (default arc_easy)")
    p.add_argument("--epochs", type=int, default=3, help="default 3")
    p.add_argument("--lr", type=float, default=1e-3, help="default 1e-3")
    p.add_argument("--test-items", type=int, default=300, help="test items scored before and after (default 300)")
    p.add_argument("--cache-dir", type=Path, default=None, help="default $DLORA_CACHE or ~/.cache/dlora")
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="default runs/demo")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlora", description="Fine-tune an LLM with LoRA from this device: the raw text and token ids stay here; what crosses "
                                "can be inverted unless a defence is on (dlora attack measures it; docs/privacy.md).")
    p.add_argument("--log-level", default=os.environ.get("DLORA_LOG_LEVEL", "WARNING"), help="default WARNING")
    p.add_argument("--daemon", default=None, metavar="ADDR",
                   help="the dlora-edge daemon (default $DLORA_DAEMON or unix:~/.cache/dlora/edge/daemon.sock)")
    sub = p.add_subparsers(dest="command", required=True)
    _train_flags(sub.add_parser("train", help="fine-tune through dlora-cloud (split learning)"), split=True)
    _train_flags(sub.add_parser("local-train", help="fine-tune with plain PEFT on this machine (the baseline)"), split=False)
    _eval_flags(sub.add_parser("eval", help="multiple-choice accuracy through dlora-cloud (forward only)"))
    report = sub.add_parser("report", help="pictures (PNG) and a Markdown summary of a run folder")
    report.add_argument("run_dir", type=Path, help="the --output folder of `dlora train` or `dlora local-train`")
    add_control_commands(sub)
    _prepare_flags(sub.add_parser("prepare", help="make the offline real model or a task ready in the cache"))
    _bench_flags(sub.add_parser("bench", help="measure the split against local PEFT training, the two stepping in turn"))
    _demo_flags(sub.add_parser("demo", help="start a local cloud and fine-tune SmolLM2-135M on a real task"))
    add_attack_flags(sub.add_parser("attack", help="measure what a curious cloud recovers from a session (docs/privacy.md)"))
    return p


def train_config(args: argparse.Namespace, split: bool) -> TrainConfig:
    """The TrainConfig for train/local-train flags; a flag left unset takes the config's default.

    Raises:
        ConfigError: a flag value is invalid, or --output already holds an adapter.
    """
    fields = TrainConfig.model_fields  # --model sets model, --reply-timeout reply_timeout_s (flag_error maps back)
    given = {f: v for flag, v in vars(args).items() if v is not None and flag not in ("targets", "budget")
             for f in (flag, flag + "_s") if f in fields}
    if args.budget is not None:
        if args.budget != "all" and not args.budget.isdigit():
            raise ConfigError(f"--budget={args.budget!r}: use a positive number of modules or all")
        given["budget"] = None if args.budget == "all" else int(args.budget)
    if args.targets:
        given["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    noise_fields = ("privacy_noise", "privacy_clip", "grad_noise", "grad_clip", "grad_noise_rows", "noise_seed")
    noise = [f for f in noise_fields if f in given]
    if noise and not split:
        flags = ", ".join("--" + f.replace("_", "-") for f in noise)
        raise ConfigError(f"{flags}: local-train sends nothing up, so there is nothing to noise; use dlora train "
                          "(against a local dlora-cloud serve) to measure the noise's cost")
    try:
        cfg = TrainConfig(shuffle=not args.no_shuffle, progress=not args.no_progress, **given)
    except ValidationError as e:
        raise flag_error(e) from None
    if (cfg.output / "adapter_model.safetensors").exists() and not args.overwrite:
        raise ConfigError(f"--output {cfg.output} already holds an adapter; choose another folder or pass --overwrite")
    if not cfg.data.is_file():
        raise ConfigError(f"--data {cfg.data}: no such file")
    client_tls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)  # the TLS files, checked before any model loads
    return cfg


def _train(args: argparse.Namespace, split: bool) -> int:
    from edge_client.remote.link import device_token
    from edge_client.remote.split_engine import SplitEngine
    from edge_client.train.engines import LocalEngine
    from edge_client.train.trainer import train

    cfg = train_config(args, split)
    if args.detach:
        from edge_client.app.control import submit

        if cfg.token_file is not None:  # the daemon's session reads the file (the token never enters its state dir)
            device_token(cfg.token_file, os.environ)  # unreadable or empty: refused here, before the daemon sees it
        elif split and os.environ.get("DLORA_TOKEN"):
            raise ConfigError("--detach: the daemon does not see this shell's $DLORA_TOKEN; "
                              "pass --token-file FILE instead")
        return submit(args.daemon, cfg, "train" if split else "local-train")
    engine = SplitEngine(cfg, token=device_token(cfg.token_file, os.environ)) if split else LocalEngine(cfg)
    try:
        result = train(cfg, engine)
    finally:
        engine.close()
    losses = " ".join(f"{x:.4f}" for x in result.epoch_losses)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s; loss per epoch: {losses}; adapter in {result.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from edge_client.app.evaluate import run_eval
    from edge_client.remote.link import LinkConfig, device_token

    wire = _given(args.wire, "wire")
    link = LinkConfig(address=args.cloud, tls=client_tls(args.tls_ca, args.tls_cert, args.tls_key),
                      codec_up=args.wire_up or wire, codec_down=args.wire_down or wire,
                      int8_block_size=check_int8_block_size(_given(args.int8_block_size, "int8_block_size")),
                      token=device_token(args.token_file, os.environ), protocol=_given(args.protocol, "protocol"),
                      weights_wire=_given(args.weights_wire, "weights_wire"))
    return run_eval(args, args.cache_dir or default_cache(), link, _given(args.max_length, "max_length"))


def _prepare(args: argparse.Namespace) -> int:
    from edge_client.tools.model_prep import SUPPORTED_MODELS, prepare_model
    from edge_client.tools.tasks import TASK_NAMES, prepare_task

    cache = args.cache_dir or default_cache()
    names = [*SUPPORTED_MODELS, *TASK_NAMES] if args.name == "all" else [args.name]
    for name in names:
        if name in SUPPORTED_MODELS:
            print(prepare_model(name, cache))
        elif name in TASK_NAMES:
            print(prepare_task(name, cache, seed=args.seed))
        else:
            raise ConfigError(f"unknown name {name!r}; use one of {', '.join([*SUPPORTED_MODELS, *TASK_NAMES])} or all")
    return 0


def main(argv: list[str] | None = None) -> int:
    tune_process()  # before anything imports torch: see common/tuning.py
    args = _parser().parse_args(argv)
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():
            if args.command in ("train", "local-train"):
                return _train(args, split=args.command == "train")
            if args.command == "eval":
                return _eval(args)
            if args.command == "prepare":
                return _prepare(args)
            if args.command == "attack":
                from edge_client.attack.command import run_attack_command

                return run_attack_command(args, train_config)
            if args.command in CONTROL_COMMANDS:
                return run_control(args)
            if args.command == "report":
                from edge_client.app.report import write_report

                path = write_report(args.run_dir)
                print(f"wrote {path} and its pictures:")
                for png in sorted(path.parent.glob("*.png")):
                    print(f"  {png}")
                return 0
            if args.command == "bench":
                from edge_client.tools.bench import run_bench

                return run_bench(args, default_cache())
            from edge_client.tools.demo import run_demo

            return run_demo(args, args.cache_dir or default_cache())
    except RemoteError as e:
        print(f"dlora: error: {e}", file=sys.stderr)
        return 3
    except DloraError as e:
        print(f"dlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
