"""One training session on the cloud: what the Hello fixed, and the loop that serves the stream.

A session opens with a Hello (`open_spec` checks it against the hosted model and fixes the
`SessionSpec`, with its step protocol). Then `run_session` reads the edge's messages in order and
routes each by kind: a StepBegin starts a micro-batch (`cloud_server.step.StepRun`) on the shared
compute pool, the edge's replies inside a micro-batch go to the one they name, a StepWeights
(adapter protocol) updates the stream's weights and opens a step (`cloud_server.adapter`), and an
EpochReport goes through Redis to the Kill-and-Revive scheduler (`answer_report`). Many
micro-batches of a session may run at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cloud_server.adapter import AdapterStep, LoraSpec, WeightCache
from cloud_server.kr_queue import KRQueue
from cloud_server.recorder import session_recorder
from cloud_server.stack import DecoderStack
from cloud_server.step import StepRun
from cloud_server.stream import EdgeStream
from common.config import STEP_PROTOCOLS, WEIGHT_CODECS, ServeConfig
from common.errors import DrainingError, ProtocolError, SessionError
from common.families import target_groups
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.scheduler import KRConfig, KRState
from common.wire import codecs
from common.wire.adapter import AdapterLayout
from common.wire.frames import Frame
from common.wire.protocol import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, PROTOCOL, WIRE_CODECS

log = logging.getLogger(__name__)

STEP_REPLIES = ("lora_delta", "hidden_grad", "lora_grad")  # the edge's answers inside a running micro-batch


class Wake(Exception):
    """Put on a stream's inbox when its last running micro-batch ends, or when the worker starts draining: the
    session loop's wait starts over (or, draining with nothing running, the stream ends)."""


@dataclass(frozen=True)
class SessionSpec:
    """What the Hello fixed for the whole session."""

    session_id: str
    groups: list[tuple[str, ...]]  # present targets per input group of a layer
    group_widths: list[int]  # O: sum of output widths per group
    codec_up: str
    codec_down: str
    block_size_down: int
    kr: KRConfig
    lora: LoraSpec | None = None  # the adapter protocol's LoRA settings; None: layerwise
    edge_layers: int = 0  # k: the edge runs layers 0..k-1 itself, this cloud starts at layer k

    @property
    def protocol(self) -> str:
        return "adapter" if self.lora is not None else "layerwise"

    def record(self, fingerprint: str, targets: list[str]) -> dict:
        """What must match when an edge resumes this session (stored in Redis)."""
        return {"fingerprint": fingerprint, "targets": list(targets), "codec_up": self.codec_up,
                "codec_down": self.codec_down, "kr": self.kr.__dict__, "protocol": self.protocol,
                **({"lora": self.lora.record()} if self.lora is not None else {}),
                **({"edge_layers": self.edge_layers} if self.edge_layers else {})}


def _lora_spec(hello: pb.Hello, stack: DecoderStack, groups: list[tuple[str, ...]], max_adapter_mb: int,
               edge_layers: int = 0) -> LoraSpec:
    """The adapter protocol's LoRA settings from a Hello, checked before the session holds any weights.

    Raises:
        ProtocolError: a rank, alpha, dropout or weights codec out of range, or an adapter over --max-adapter-mb.
    """
    paths = tuple(p for g in groups for p in g)
    rank = hello.lora_rank
    if rank < 1:
        raise ProtocolError("adapter protocol: lora_rank must be >= 1")
    if not (math.isfinite(hello.lora_alpha) and hello.lora_alpha > 0):
        raise ProtocolError("adapter protocol: lora_alpha must be finite and > 0")
    if not 0 <= hello.lora_dropout < 1:
        raise ProtocolError("adapter protocol: lora_dropout must be in [0, 1)")
    # unset is float32; an enum value no codec has is refused, not read as float32
    known = codecs.BY_ENUM[hello.codec_weights].name if hello.codec_weights in codecs.BY_ENUM else ""
    codec = known if hello.codec_weights else "float32"
    if codec not in WEIGHT_CODECS:
        raise ProtocolError(f"adapter protocol: codec_weights must be one of {', '.join(WEIGHT_CODECS)}")
    layout = AdapterLayout(stack.num_layers, rank, tuple((stack.in_width(p), stack.out_width(p)) for p in paths))
    mb = 4 * layout.total_numel(range(layout.num_modules)) / 2**20  # held as float32
    if mb > max_adapter_mb:
        raise ProtocolError(f"adapter protocol: a rank-{rank} adapter on {len(paths)} targets x {stack.num_layers} layers "
                            f"is {mb:.1f} MB, this cloud holds at most {max_adapter_mb} MB per session "
                            "(--max-adapter-mb); lower --rank or use fewer --targets")
    return LoraSpec(layout, hello.lora_alpha, hello.lora_dropout, hello.dropout_seed, codec, paths, edge_layers)


def open_spec(hello: pb.Hello, stack: DecoderStack, session_id: str, max_adapter_mb: int = 512) -> SessionSpec:
    """Check a Hello against the hosted model and fix the session's shape.

    Raises:
        SessionError: protocol or base model differ.
        ProtocolError: unknown targets, codecs or step protocol, bad LoRA settings (adapter), or edge layers
            that leave this cloud no layer.
    """
    if hello.protocol != PROTOCOL:
        raise SessionError(f"edge speaks protocol {hello.protocol!r}, this cloud speaks {PROTOCOL!r}; upgrade one side")
    if hello.model_fingerprint != stack.fingerprint:
        raise SessionError(
            f"base model mismatch: the edge holds model {hello.model_fingerprint}, this cloud serves "
            f"{stack.config.model_type} {stack.fingerprint} from {stack.model_dir}; use the same model folder on both sides"
        )
    known = set(stack.family.all_paths())
    bad = [t for t in hello.targets if t not in known]
    if bad or not hello.targets:
        raise ProtocolError(f"targets {bad or '(none)'} are not LoRA-able modules of a {stack.config.model_type} layer")
    groups = target_groups(stack.family, tuple(hello.targets))
    widths = [sum(stack.out_width(p) for p in g) for g in groups]
    codec_up = codecs.BY_ENUM[hello.codec_up].name if hello.codec_up in codecs.BY_ENUM else ""
    codec_down = codecs.BY_ENUM[hello.codec_down].name if hello.codec_down in codecs.BY_ENUM else ""
    if codec_up not in WIRE_CODECS or codec_down not in WIRE_CODECS:
        raise ProtocolError(f"unsupported codecs up={hello.codec_up} down={hello.codec_down}")
    kr = KRConfig(
        num_layers=stack.num_layers,
        warmup_epochs=hello.warmup_epochs if hello.HasField("warmup_epochs") else 1,
        budget=hello.budget or None,
        revive=hello.revive,
        kill_threshold=hello.kill_threshold or None,
    )
    block = hello.block_size_down or DEFAULT_BLOCK_SIZE
    if block > MAX_BLOCK_SIZE:  # what this cloud would encode with, and what the edge would refuse
        raise ProtocolError(f"block_size_down {block}: int8 blocks hold at most {MAX_BLOCK_SIZE} elements")
    if hello.step_protocol not in (pb.LAYERWISE, pb.ADAPTER):
        raise ProtocolError(f"step_protocol {hello.step_protocol}: this cloud speaks {', '.join(STEP_PROTOCOLS)}")
    if hello.edge_layers >= stack.num_layers:
        raise ProtocolError(f"edge_layers {hello.edge_layers}: this cloud's {stack.config.model_type} has "
                            f"{stack.num_layers} layers; the edge may run at most {stack.num_layers - 1} of them")
    k = hello.edge_layers
    lora = _lora_spec(hello, stack, groups, max_adapter_mb, k) if hello.step_protocol == pb.ADAPTER else None
    return SessionSpec(session_id, groups, widths, codec_up, codec_down, block, kr, lora, k)


def answer_report(report: pb.EpochReport, spec: SessionSpec, kr: KRQueue, timeout_s: float) -> pb.CloudMessage:
    """Publish an epoch report to the scheduler's queue and turn its decision into a KRCommand.

    Raises:
        ProtocolError: the report is malformed or the scheduler refused it.
    """
    if len(report.layers) != len(report.deltas) or any(x >= spec.kr.num_layers for x in report.layers):
        raise ProtocolError(f"epoch report {report.epoch}: layers and deltas must pair up, layers < {spec.kr.num_layers}")
    if len(set(report.layers)) != len(report.layers) or not all(math.isfinite(d) and d >= 0 for d in report.deltas):
        raise ProtocolError(f"epoch report {report.epoch}: each layer once, each delta finite and >= 0")
    record = kr.store.load(spec.session_id)
    done = KRState.from_json(record["kr_state"]).epochs_done if record else 0
    if not 1 <= report.epoch <= done + 1:  # the scheduler would drop it, and the session wait for nothing
        raise ProtocolError(f"epoch report {report.epoch}: this session has reported {done} epochs; "
                            f"send epoch {done + 1} (or re-send one of 1..{done})")
    kr.submit(spec.session_id, report.epoch, dict(zip(report.layers, report.deltas)))
    decision = kr.wait_command(spec.session_id, report.epoch, timeout_s)
    if "error" in decision:
        raise ProtocolError(f"epoch report {report.epoch}: {decision['error']}")
    return pb.CloudMessage(kr_command=pb.KRCommand(
        epoch=report.epoch, active=decision["active"], killed=decision["killed"],
        revived=decision["revived"], next_active=decision["next_active"]))


def compute_pool(max_sessions: int, max_micro_batches: int) -> ThreadPoolExecutor:
    """The threads that run micro-batches, shared by all sessions and kept for the server's life.

    Reused threads matter on a CPU: measured alone, the bench model's forward and backward ran ~1.4x
    slower in a fresh thread than in a long-lived one (each new thread starts a new OpenMP team and a
    new malloc arena, so its activations are page-faulted in again). Idle threads are reused; new ones
    are made only while all are busy.
    """
    return ThreadPoolExecutor(max_workers=max_sessions * max_micro_batches, thread_name_prefix="dlora-step")


class _Dispatcher:
    """Routes one session's incoming messages by kind, and tracks its running micro-batches."""

    def __init__(self, stream: EdgeStream, stack: DecoderStack, spec: SessionSpec, limits: ServeConfig, kr: KRQueue,
                 pool: ThreadPoolExecutor) -> None:
        self.stream, self.stack, self.spec, self.limits, self.kr, self.pool = stream, stack, spec, limits, kr, pool
        self.running: dict[tuple[int, int], StepRun] = {}  # (step, micro-batch) -> its run
        self.tokens: dict[tuple[int, int], int] = {}  # (step, micro-batch) -> B x T of each running one
        self.quiet_since = time.monotonic()  # the edge's last message, or the last micro-batch's end
        self.lock = threading.Lock()  # guards `running` and `failures`: micro-batches end on pool threads
        self.failures: list[BaseException] = []  # errors of micro-batches that end the session
        # adapter protocol: this stream's weights, and the step the last StepWeights opened
        self.cache = WeightCache(spec.lora, stack.device, limits.step_timeout_s) if spec.lora is not None else None
        self.adapter_step: AdapterStep | None = None
        self.recorder = session_recorder(limits, spec, stack, kr)  # --record: the first steps' copies; None: off
        self.handlers: dict[str, Callable[[Frame], None]] = {
            "step_begin": self._start_step,
            "epoch_report": self._report_epoch,
            "step_weights": self._take_weights,
            **dict.fromkeys(STEP_REPLIES, self._deliver),
        }

    def dispatch(self, msg: Frame) -> None:
        """Hand one edge message to its handler.

        Raises:
            ProtocolError: a kind that has no place in a running session, or a micro-batch started twice.
        """
        handler = self.handlers.get(msg.kind)
        if handler is None:
            raise ProtocolError(f"unexpected {msg.kind} in a session")
        handler(msg)

    def patience(self) -> tuple[float, str]:
        """How long to wait for the edge's next message, and the limit that says so: --step-timeout while
        micro-batches run; between steps, what is left of --idle-timeout since the session went quiet
        (its last message, or its last micro-batch's end, which wakes the loop: `_finished`)."""
        with self.lock:
            if self.running:
                return self.limits.step_timeout_s, f"--step-timeout ({self.limits.step_timeout_s:g}s)"
            left = self.limits.idle_timeout_s - (time.monotonic() - self.quiet_since)
        return max(left, 0.0), f"--idle-timeout ({self.limits.idle_timeout_s:g}s between steps)"

    def heard(self) -> None:
        """The edge sent a message: the idle clock starts again."""
        with self.lock:
            self.quiet_since = time.monotonic()

    def idle(self) -> bool:
        """No micro-batch of this session runs: the next step-starting message begins a new step."""
        with self.lock:
            return not self.running

    def raise_failure(self) -> None:
        """Re-raise the first error that ended a micro-batch and must end the session."""
        if self.failures:
            raise self.failures[0]

    def close(self) -> None:
        """Tell every running micro-batch that the stream has ended (one waiting for weights stops waiting)."""
        if self.adapter_step is not None:
            self.adapter_step.abandon(stream_ended=True)
        with self.lock:
            for run in self.running.values():
                run.inbox.put(None)

    def _start_step(self, msg: Frame) -> None:
        """Start a micro-batch on the compute pool.

        Raises:
            ProtocolError: this (step, micro-batch) is already running.
        """
        body = msg.body
        key = (body.step, body.micro_batch)
        with self.lock:
            if key in self.running:
                raise ProtocolError(f"step {body.step} micro-batch {body.micro_batch} is already running")
            tokens, refusal = self._over_limit(body)
            if refusal is None:
                run = StepRun(msg, self.spec, self.stream, self.stack, self._finished, self.adapter_step)
                run.rec = self.recorder.micro_batch(body) if self.recorder else None
                self.running[key], self.tokens[key] = run, tokens
        if refusal is not None:
            log.warning("session %s: %s", self.spec.session_id, refusal)
            self.stream.send(pb.CloudMessage(step_error=pb.StepError(
                step=body.step, micro_batch=body.micro_batch, code="RESOURCE_EXHAUSTED", message=refusal)))
            return
        self.pool.submit(run.run)

    def _over_limit(self, begin: pb.StepBegin) -> tuple[int, str | None]:
        """(B x T of this micro-batch, why it is refused or None): over --max-micro-batches running, or over
        --max-tokens in flight with the session's running ones (a step's micro-batches together). Reads
        only the header's shape, before anything is allocated; a malformed shape counts 0 and is refused
        by check_begin. Call with the lock held."""
        where = f"step {begin.step} micro-batch {begin.micro_batch}"
        if len(self.running) >= self.limits.max_micro_batches:
            return 0, (f"{where}: {len(self.running)} micro-batches of this session are already running, the most "
                       "this cloud takes (--max-micro-batches); use fewer --micro-batches")
        shape = begin.embeddings.shape
        tokens = shape[0] * shape[1] if len(shape) == 3 and shape[0] > 0 and shape[1] > 0 else 0
        in_flight = tokens + sum(self.tokens.values())
        if in_flight > self.limits.max_tokens:
            return tokens, (f"{where}: {in_flight} tokens (B x T) in flight, this cloud takes at most "
                            f"{self.limits.max_tokens} per session (--max-tokens); lower --batch-size or --max-length")
        return tokens, None

    def _take_weights(self, msg: Frame) -> None:
        """Adapter protocol: add a StepWeights' weights to the stream's cache and open its step; a bad one
        is answered with a StepError and changes nothing (the session stays usable)."""
        body: pb.StepWeights = msg.body
        try:
            if self.cache is None:
                raise ProtocolError("StepWeights in a layerwise session; open it with step_protocol ADAPTER")
            step = self.adapter_step
            continues = step is not None and step.more and step.step == body.step  # the next layers' weights
            with self.lock:
                if self.running and not continues:
                    raise ProtocolError(f"StepWeights of step {body.step} while micro-batches are still running")
            if not continues:
                self.adapter_step = None
            self.adapter_step = self.cache.update(msg, self.limits.max_micro_batches, step if continues else None)
            if self.recorder:
                self.recorder.step_weights(body.step, self.cache.spec, {m: self.cache.weights[m] for m in body.modules},
                                           continues)
        except ProtocolError as e:
            if self.adapter_step is not None:  # a refused continuation: layers waiting for it give up
                self.adapter_step.abandon()
            log.warning("session %s: %s", self.spec.session_id, e)
            self.stream.send(pb.CloudMessage(step_error=pb.StepError(
                step=body.step, code="INVALID_ARGUMENT", message=str(e))))

    def _finished(self, run: StepRun) -> None:
        with self.lock:
            self.running.pop(run.key, None)
            self.tokens.pop(run.key, None)
            if run.failure is not None:
                self.failures.append(run.failure)
            quiet = not self.running
            if quiet:
                self.quiet_since = time.monotonic()
        if quiet:  # the loop may be waiting --step-timeout: it waits --idle-timeout from now instead
            self.stream.interrupt(Wake())

    def _deliver(self, msg: Frame) -> None:
        """Hand an edge reply to the micro-batch it names (ignored, with a warning, if none runs)."""
        body = msg.body
        with self.lock:
            run = self.running.get((body.step, body.micro_batch))
        if run is None:
            log.warning("session %s: %s for step %d/%d, which is not running; ignored",
                        self.spec.session_id, msg.kind, body.step, body.micro_batch)
        else:
            run.inbox.put(msg)

    def _report_epoch(self, msg: Frame) -> None:
        """Answer an epoch report with a KRCommand, or a StepError that leaves the session usable."""
        try:
            with self.lock:
                if self.running:
                    raise ProtocolError("epoch report while micro-batches are still running")
            self.stream.send(answer_report(msg.body, self.spec, self.kr, self.stream.reply_timeout_s))
            if self.recorder:
                self.recorder.reported(msg.body.epoch)
        except ProtocolError as e:
            log.warning("session %s: %s", self.spec.session_id, e)
            self.stream.send(pb.CloudMessage(step_error=pb.StepError(code="INVALID_ARGUMENT", message=str(e))))


def _drained(spec: SessionSpec) -> DrainingError:
    """How a stream ends when its worker drains (UNAVAILABLE: the device reconnects and redoes the step)."""
    return DrainingError(f"this worker is shutting down; reconnect to continue session {spec.session_id} "
                         "(on another worker behind the same address)")


def run_session(stream: EdgeStream, stack: DecoderStack, spec: SessionSpec, limits: ServeConfig, kr: KRQueue,
                pool: ThreadPoolExecutor, before_step: Callable[[], None] | None = None,
                draining: Callable[[], bool] = lambda: False) -> None:
    """Serve micro-batches (concurrently, on `pool`'s threads) and epoch reports until the edge closes the stream.

    Bad input abandons one micro-batch (or report), not the session. `before_step` runs before every
    StepWeights, StepBegin and EpochReport is dispatched (the device token's check: what it raises ends the
    session).

    `limits` is the serve config: --max-tokens and --max-micro-batches refuse a micro-batch (RESOURCE_EXHAUSTED
    in its StepError), --idle-timeout ends a stream silent between steps, --step-timeout one silent in a step.
    Once `draining()` says so, the stream ends (UNAVAILABLE) at its next step boundary: a new step's first
    message, or an epoch report, while none of its micro-batches runs; the device redoes that step elsewhere.

    Raises:
        SilenceError: the edge went silent (DEADLINE_EXCEEDED).
        ProtocolError: a message that has no place in a running session, or one that could not be parsed.
    """
    session = _Dispatcher(stream, stack, spec, limits, kr, pool)
    try:
        while True:
            try:
                msg = stream.recv(*session.patience())
            except Wake:
                session.raise_failure()  # a micro-batch's error that ends the session ends it now
                if draining() and session.idle():  # the step in flight is done: end here, not at the next one
                    raise _drained(spec) from None
                continue
            if msg is None:
                break
            session.heard()
            session.raise_failure()
            if msg.kind in ("step_weights", "step_begin", "epoch_report"):
                if draining() and session.idle():
                    raise _drained(spec)
                if before_step is not None:
                    before_step()
            session.dispatch(msg)
        session.raise_failure()
    finally:
        session.close()
