"""`dlora`: the device-side command line (train, local-train, eval, prepare, demo).

Environment variables read here only: DLORA_CACHE (default cache folder), DLORA_LOG_LEVEL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from common.config import TrainConfig, check_int8_block_size, flag_error
from common.errors import ConfigError, DloraError, RemoteError
from common.tuning import tune_process
from common.wire.protocol import WIRE_CODECS

log = logging.getLogger("dlora")


def default_cache() -> Path:
    return Path(os.environ.get("DLORA_CACHE", Path.home() / ".cache" / "dlora"))


def _wire_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wire", default="float32", choices=WIRE_CODECS,
                   help="codec for activations and gradients on the wire (default float32)")
    p.add_argument("--wire-up", default=None, choices=WIRE_CODECS,
                   help="codec of what this device sends (default: --wire); e.g. int8 on a slow uplink")
    p.add_argument("--wire-down", default=None, choices=WIRE_CODECS, help="codec of what the cloud sends (default: --wire)")
    p.add_argument("--int8-block-size", type=int, default=4096,
                   help="int8: elements per absmax scale, both directions (default 4096)")


def _train_flags(p: argparse.ArgumentParser, split: bool) -> None:
    if split:
        p.add_argument("--cloud", required=True, metavar="HOST:PORT", help="address of `dlora-cloud serve`")
        _wire_flags(p)
        p.add_argument("--micro-batches", type=int, default=1,
                       help="split each batch into M micro-batches that overlap on the wire (default 1)")
        p.add_argument("--connect-timeout", type=float, default=15.0, help="seconds to reach the cloud (default 15)")
        p.add_argument("--reply-timeout", type=float, default=600.0, help="longest wait for one cloud message (default 600)")
        p.add_argument("--max-message-mb", type=int, default=512, help="gRPC message size limit in MB (default 512)")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (config, tokenizer, safetensors)")
    p.add_argument("--data", required=True, type=Path, help='JSONL: {"text"} or {"prompt", "completion"} per line')
    p.add_argument("--output", required=True, type=Path, help="folder for the PEFT adapter and metrics.jsonl")
    p.add_argument("--epochs", type=int, default=4, help="default 4 (the paper's Table 6)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    p.add_argument("--targets", default=None, help="comma-separated target modules (default: PEFT's for the family)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the cosine decay (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (default 16)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example, longer ones truncated (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seeds LoRA init, data order and dropout (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the data file's order")
    p.add_argument("--warmup-epochs", type=int, default=1, help="Kill-and-Revive: epochs with every module trained (default 1)")
    p.add_argument("--budget", default="all", help="Kill-and-Revive: modules (layers) trained after warm-up, N or all (default all)")
    p.add_argument("--revive", type=int, default=0, help="Kill-and-Revive: modules swapped each later epoch (default 0)")
    p.add_argument("--kill-threshold", type=float, default=None,
                   help="Early-Kill: kill modules whose change is below X times the mean (default off)")
    p.add_argument("--kill-mode", default="detached", choices=["frozen", "detached", "dropped"],
                   help="what a killed module costs: frozen (delta + gradient path), detached (delta only, default), "
                        "dropped (nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where this device computes (train: embedding, head, LoRA; local-train: the model) (default cpu)")
    if not split:
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the frozen base model (default float32)")
    p.add_argument("--detach", action="store_true",
                   help="submit to the dlora-edge daemon and return; follow with `dlora status` / `dlora logs`")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlora", description="Fine-tune an LLM with LoRA; your data stays on this device.")
    p.add_argument("--log-level", default=os.environ.get("DLORA_LOG_LEVEL", "WARNING"), help="default WARNING")
    p.add_argument("--daemon", default=None, metavar="ADDR",
                   help="the dlora-edge daemon (default $DLORA_DAEMON or unix:~/.cache/dlora/edge/daemon.sock)")
    sub = p.add_subparsers(dest="command", required=True)
    _train_flags(sub.add_parser("train", help="fine-tune through dlora-cloud (split learning)"), split=True)
    _train_flags(sub.add_parser("local-train", help="fine-tune with plain PEFT on this machine (the baseline)"), split=False)

    e = sub.add_parser("eval", help="multiple-choice accuracy through dlora-cloud (forward only)")
    e.add_argument("--cloud", required=True, metavar="HOST:PORT", help="address of `dlora-cloud serve`")
    e.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    e.add_argument("--adapter", type=Path, default=None, help="PEFT adapter folder from `dlora train` (default: base model)")
    e.add_argument("--data", type=Path, default=None, help='JSONL: {"prompt", "choices", "answer"} per line')
    e.add_argument("--tasks", default=None,
                   help="prepared tasks instead of --data, e.g. piqa,arc_easy (their 75%% test splits); all = every task")
    e.add_argument("--cache-dir", type=Path, default=None, help="for --tasks: default $DLORA_CACHE or ~/.cache/dlora")
    e.add_argument("--limit", type=int, default=None, help="score only the first N items")
    e.add_argument("--max-length", type=int, default=256, help="tokens per scored sequence (default 256)")
    e.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _wire_flags(e)

    rp = sub.add_parser("report", help="pictures (PNG) and a Markdown summary of a run folder")
    rp.add_argument("run_dir", type=Path, help="the --output folder of `dlora train` or `dlora local-train`")

    st = sub.add_parser("status", help="status of daemon sessions (one, or all)")
    st.add_argument("session_id", nargs="?", default="", help="a session id (default: all)")
    st.add_argument("--json", action="store_true", help="print JSON")
    lg = sub.add_parser("logs", help="a daemon session's log")
    lg.add_argument("session_id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the session ends")
    for name, text in (("stop", "stop a daemon session at the next step (resumable)"),
                       ("resume", "resume a stopped or failed daemon session from its last checkpoint")):
        sub.add_parser(name, help=text).add_argument("session_id")
    sub.add_parser("list", help="every daemon session, one line each")

    r = sub.add_parser("prepare", help="make the offline real model or a task ready in the cache")
    r.add_argument("name", help="smollm2-135m, a task (boolq, piqa, siqa, hellaswag, winogrande, openbookqa, "
                                "arc_easy, arc_challenge, sst2) or all")
    r.add_argument("--cache-dir", type=Path, default=None, help="default $DLORA_CACHE or ~/.cache/dlora")
    r.add_argument("--seed", type=int, default=0, help="seed of the 25%%/75%% train/test split (default 0)")

    b = sub.add_parser("bench", help="measure the split against local PEFT training, the two stepping in turn")
    b.add_argument("--model", type=Path, default=None,
                   help="model folder (default: a LLaMA-shaped random-weight model, ~34M parameters)")
    b.add_argument("--steps", type=int, default=6, help="timed steps per configuration, after one warm-up (default 6)")
    b.add_argument("--batch-size", type=int, default=8, help="default 8")
    b.add_argument("--seq-len", type=int, default=128, help="default 128")
    b.add_argument("--wires", default="float32,bfloat16,int8",
                   help="codecs to measure; UP/DOWN for one per direction, e.g. int8/bfloat16 (default float32,bfloat16,int8)")
    b.add_argument("--int8-block-size", type=int, default=4096, help="int8: elements per absmax scale (default 4096)")
    b.add_argument("--targets", default=None,
                   help="LoRA target modules, comma-separated PEFT-style names (default: those reading the attention's "
                        "input: q_proj,k_proj,v_proj, or query_key_value / c_attn where q, k and v are fused)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--budgets", default="all,L/2,L/4", help="active modules: all, L/N or a number (default all,L/2,L/4)")
    b.add_argument("--micro-batches", default="1", help="comma-separated M values (default 1)")
    b.add_argument("--kill-mode", default="detached", choices=["frozen", "detached", "dropped"], help="default detached")
    b.add_argument("--wan", default=None, metavar="DELAY,RATE",
                   help="emulate a device link, e.g. 10ms,100mbit (one-way delay, rate each way) or 10ms,20mbit/100mbit "
                        "(uplink/downlink): kernel netem where the machine has it (root), else a user-space relay")
    b.add_argument("--shape", default="small", choices=["small", "llama-7b"],
                   help="default model when --model is not given: small (~34M, LLaMA-shaped) or llama-7b (random weights)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the device side (and the local-train baseline) computes (default cpu)")
    b.add_argument("--local-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the local-train baseline's frozen model (default float32)")
    b.add_argument("--cloud-device", default="cpu", choices=["cpu", "cuda"], help="where the cloud runs (default cpu)")
    b.add_argument("--cloud-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="default float32")
    b.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    b.add_argument("--markdown", type=Path, default=None, help="write the Markdown table here")

    d = sub.add_parser("demo", help="start a local cloud and fine-tune SmolLM2-135M on a real task")
    d.add_argument("--task", default="arc_easy", help="prepared task to fine-tune on (default arc_easy)")
    d.add_argument("--epochs", type=int, default=3, help="default 3")
    d.add_argument("--lr", type=float, default=1e-3, help="default 1e-3")
    d.add_argument("--test-items", type=int, default=300, help="test items scored before and after (default 300)")
    d.add_argument("--cache-dir", type=Path, default=None, help="default $DLORA_CACHE or ~/.cache/dlora")
    d.add_argument("--output", type=Path, default=Path("runs/demo"), help="default runs/demo")
    return p


def train_config(args: argparse.Namespace, split: bool) -> TrainConfig:
    """The TrainConfig for train/local-train flags.

    Raises:
        ConfigError: a flag value is invalid, or --output already holds an adapter.
    """
    if args.budget != "all" and not args.budget.isdigit():
        raise ConfigError(f"--budget={args.budget!r}: use a positive number of modules or all")
    extra: dict[str, object] = dict(
        warmup_epochs=args.warmup_epochs, budget=None if args.budget == "all" else int(args.budget),
        revive=args.revive, kill_threshold=args.kill_threshold, kill_mode=args.kill_mode,
    )
    if split:
        extra.update(cloud=args.cloud, wire=args.wire, wire_up=args.wire_up, wire_down=args.wire_down,
                     int8_block_size=args.int8_block_size, micro_batches=args.micro_batches, connect_timeout_s=args.connect_timeout,
                     reply_timeout_s=args.reply_timeout, max_message_mb=args.max_message_mb)
    try:
        cfg = TrainConfig(
            model=args.model, data=args.data, output=args.output, epochs=args.epochs, rank=args.rank,
            alpha=args.alpha, lora_dropout=args.lora_dropout,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None,
            lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
            max_length=args.max_length, seed=args.seed, shuffle=not args.no_shuffle,
            progress=not args.no_progress, device=args.device, dtype=getattr(args, "dtype", "float32"), **extra,
        )
    except ValidationError as e:
        raise flag_error(e) from None
    if (cfg.output / "adapter_model.safetensors").exists() and not args.overwrite:
        raise ConfigError(f"--output {cfg.output} already holds an adapter; choose another folder or pass --overwrite")
    if not cfg.data.is_file():
        raise ConfigError(f"--data {cfg.data}: no such file")
    return cfg


def _train(args: argparse.Namespace, split: bool) -> int:
    from edge_client.remote.split_engine import SplitEngine
    from edge_client.train.engines import LocalEngine
    from edge_client.train.trainer import train

    cfg = train_config(args, split)
    if args.detach:
        from edge_client.app.control import submit

        return submit(args.daemon, cfg, "train" if split else "local-train")
    engine = SplitEngine(cfg) if split else LocalEngine(cfg)
    try:
        result = train(cfg, engine)
    finally:
        engine.close()
    losses = " ".join(f"{x:.4f}" for x in result.epoch_losses)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s; loss per epoch: {losses}; adapter in {result.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from edge_client.app.evaluate import evaluate, load_items
    from edge_client.remote.link import CloudLink, LinkConfig
    from edge_client.remote.remote_step import RemoteStack
    from edge_client.tools.tasks import TASK_NAMES, prepare_task
    from edge_client.train.lora import LoraAdapter, read_adapter_config
    from edge_client.train.model_parts import EdgeModel

    if (args.data is None) == (args.tasks is None):
        raise ConfigError("dlora eval needs exactly one of --data FILE or --tasks a,b")
    if args.tasks:
        names = list(TASK_NAMES) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        cache = args.cache_dir or default_cache()
        sets = {name: load_items(prepare_task(name, cache) / "test.jsonl", args.limit) for name in names}
    else:
        sets = {args.data.stem: load_items(args.data, args.limit)}
    adapter = None
    if args.adapter is not None:
        acfg = read_adapter_config(args.adapter)
        edge = EdgeModel(args.model, tuple(acfg.get("target_modules") or ()) or None)
        adapter = LoraAdapter(edge, int(acfg["r"]), float(acfg["lora_alpha"]), 0.0)
        adapter.load(args.adapter)
        adapter.eval()
    else:
        edge = EdgeModel(args.model)
    link = CloudLink(LinkConfig(address=args.cloud, codec_up=args.wire_up or args.wire,
                                codec_down=args.wire_down or args.wire,
                                int8_block_size=check_int8_block_size(args.int8_block_size)), edge)
    link.open()
    results = {}
    try:
        for name, items in sets.items():
            res = evaluate(edge, RemoteStack(link, adapter), items, max_length=args.max_length,
                           progress=not args.no_progress)
            results[name] = {"accuracy": res.accuracy, "correct": res.correct, "total": res.total,
                             "predictions": res.predictions}
    finally:
        link.close()
    width = max(len(n) for n in results)
    print(f"{'task':<{width}}  accuracy  items")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['accuracy']:8.4f}  {r['total']:5d}")
    if len(results) > 1:
        mean = sum(r["accuracy"] for r in results.values()) / len(results)
        print(f"{'mean':<{width}}  {mean:8.4f}")
    if args.json:
        args.json.write_text(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=1))
    return 0


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
            if args.command in ("status", "logs", "stop", "resume", "list"):
                from edge_client.app.control import run_control

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
