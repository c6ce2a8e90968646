"""Process configs: one frozen pydantic model per process, built from CLI flags at the entry point.

The configs own every default a flag has: argparse passes None for a flag left unset, and --help
shows the field's default (`field_default`). Validation errors are turned into one line naming the
flag and the bad value (`flag_error`). Nothing here imports torch (`torch_dtype` does, when called).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import ConfigError
from common.wire.protocol import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, WIRE_CODECS

if TYPE_CHECKING:
    import torch

KillMode = Literal["frozen", "detached", "dropped"]
StepProtocolName = Literal["layerwise", "adapter"]  # dlora.v1.StepProtocol, lower case, in enum order
GradNoiseRows = Literal["all", "loss"]  # which dL/dh rows --grad-noise noises
WeightCodec = Literal["float32", "bfloat16"]  # the adapter protocol's codecs for LoRA weights and their gradients
Device = Literal["cpu", "cuda"]
Dtype = Literal["float32", "bfloat16", "float16"]
KILL_MODES: tuple[str, ...] = get_args(KillMode)  # what --kill-mode accepts
DEVICES: tuple[str, ...] = get_args(Device)  # what --device (and the bench's --cloud-device) accept
STEP_PROTOCOLS: tuple[str, ...] = get_args(StepProtocolName)  # what --protocol accepts
WEIGHT_CODECS: tuple[str, ...] = get_args(WeightCodec)  # what --weights-wire accepts
GRAD_NOISE_ROWS: tuple[str, ...] = get_args(GradNoiseRows)  # what --grad-noise-rows accepts
DTYPES: tuple[str, ...] = get_args(Dtype)  # what --dtype (and the bench's --local-dtype, --cloud-dtype) accept
MAX_MESSAGE_MB = 512  # gRPC send/receive limit, set on both ends: the cloud's and the device's default


def torch_dtype(name: str) -> torch.dtype:
    """"bfloat16" -> torch.bfloat16, for a name in DTYPES. Imports torch on first use: this module does
    not, so command lines can build configs before process tuning (common/tuning.py) has run.

    Raises:
        ConfigError: a name not in DTYPES.
    """
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)  # type: ignore[no-any-return]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServeConfig(_Frozen):
    """`dlora-cloud serve`."""

    model: Path  # Hugging Face model folder; the cloud materialises only its decoder stack
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 picks a free port, printed as `listening on HOST:PORT`
    device: Device = "cpu"
    dtype: Dtype = "float32"  # compute dtype of the frozen stack
    device_map: Literal["auto", "balanced", "sequential"] | None = None  # accelerate's placement over GPUs, then CPU
    max_sessions: int = Field(16, ge=1)  # live sessions on all workers sharing the Redis (cloud_server/slots.py)
    step_timeout_s: float = Field(600.0, gt=0)  # how long the cloud waits for one edge reply
    drain_timeout_s: float = Field(60.0, ge=0)  # on SIGTERM: how long live sessions get to finish their step
    max_message_mb: int = Field(MAX_MESSAGE_MB, ge=4)  # gRPC send/receive limit, set on both ends
    max_tokens: int = Field(1 << 16, ge=1)  # B*T a session may have in flight (a step's micro-batches together);
    # 16x a default batch (16 x 256), and what bounds a session's activations on the cloud
    # the Kill-and-Revive queue, session records, tokens; None: an embedded Redis server on state_dir. It may hold a
    # password (from --redis-url-file or $DLORA_REDIS_URL), so the config's repr leaves it out
    redis_url: str | None = Field(None, repr=False)
    state_dir: Path = Path.home() / ".cache" / "dlora" / "cloud"  # embedded Redis data
    session_ttl_s: float = Field(86400.0, gt=0)  # session keys expire after this long idle
    claim_idle_s: float = Field(5.0, gt=0)  # reports pending this long on a dead consumer are taken over
    # -- security (docs/security.md)
    tls_cert: Path | None = None  # PEM server certificate (chain); with tls_key, the server speaks TLS only
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA: every client must present a certificate it signed (mTLS)
    insecure: bool = False  # allow plaintext, or auth none, on a non-loopback address
    auth: Literal["token", "none"] | None = None  # None: none on a loopback host, token on any other
    max_sessions_per_token: int = Field(4, ge=1)  # concurrent sessions one device token may hold (all workers)
    max_micro_batches: int = Field(8, ge=1)  # micro-batches in flight per session
    max_adapter_mb: int = Field(512, ge=1)  # adapter protocol: LoRA weights one session may make the cloud hold
    # the curious operator's view (docs/security.md, common/recording.py): keep a copy of everything that crosses in
    # the first record_steps steps of every session under this folder; None: the cloud keeps nothing of a session
    record: Path | None = None
    record_steps: int = Field(4, ge=1)  # distinct step numbers recorded per session, train and eval alike
    hello_timeout_s: float = Field(10.0, gt=0)  # a stream that has not said Hello by then is closed
    idle_timeout_s: float = Field(3600.0, gt=0)  # a session stream with no message for this long between steps is closed
    keepalive_s: float = Field(30.0, gt=0)  # HTTP/2 ping interval; a peer that does not answer within it is dropped
    reports_maxlen: int = Field(100_000, ge=100)  # the Kill-and-Revive reports stream is trimmed to about this many
    report_max_tries: int = Field(5, ge=1)  # a report that fails the scheduler this often goes to the dead-letter stream


class TrainConfig(_Frozen):
    """`dlora train` and `dlora local-train` (the latter ignores the wire fields)."""

    model: Path  # Hugging Face model folder; the edge materialises only the embedding and head
    data: Path  # JSONL: {"text"} or {"prompt", "completion"} per line
    output: Path  # adapter, metrics.jsonl
    cloud: str | None = None  # HOST:PORT of dlora-cloud; None for local-train
    epochs: int = Field(4, ge=1)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    targets: tuple[str, ...] | None = None  # None: PEFT's default targets for the family
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up steps before the cosine decay
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(256, ge=2)  # tokens per example; longer ones are truncated
    seed: int = 0
    shuffle: bool = True
    wire: str = "float32"  # codec for both directions, unless wire_up / wire_down say otherwise
    wire_up: str | None = None  # codec of what the device sends (embeddings, deltas, dL/dx, dL/dh)
    wire_down: str | None = None  # codec of what the cloud sends (layer inputs, dL/d(delta), final hidden)
    int8_block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1, le=MAX_BLOCK_SIZE)  # elements per absmax scale, both directions
    micro_batches: int = Field(1, ge=1)  # split each batch; the cloud computes one while the device answers another
    protocol: StepProtocolName = "layerwise"  # layerwise: LoRA on the device (the paper); adapter: LoRA weights to the cloud
    weights_wire: WeightCodec = "float32"  # adapter: codec of the LoRA weights and their gradients
    # decoder blocks the device runs itself (`dlora train`): blocks 0..k-1 and their LoRA stay here, the cloud
    # starts at block k and sees their output, not the input embeddings; 0 = none (the cloud runs every block)
    edge_layers: int = Field(0, ge=0)
    # noise defences (edge_client/train/privacy.py, `dlora train` only): each token row clipped to L2 norm C,
    # plus N(0, (sigma x C)^2) per coordinate; sigma 0 and no clip: the tensor goes up untouched
    privacy_noise: float = Field(0.0, ge=0)  # sigma on the StepBegin tensor (input embeddings)
    privacy_clip: float | None = Field(None, gt=0)  # its clip norm C; needed when privacy_noise > 0
    grad_noise: float = Field(0.0, ge=0)  # sigma on the HiddenGrad dL/dh (it defends the labels)
    grad_clip: float | None = Field(None, gt=0)  # its clip norm C; needed when grad_noise > 0
    # which dL/dh rows get clipped and noised: every real row (the cloud cannot tell prompt from answer), or only
    # the rows that carry a loss (the others go up as the exact zeros they are: less noise in training, but the
    # cloud sees which positions are answers)
    grad_noise_rows: GradNoiseRows = "all"
    noise_seed: int | None = Field(None, ge=0, lt=1 << 63, repr=False)  # keys the noise (a secret); None: fresh per process.
    # Never derived from `seed`: the adapter protocol sends that to the cloud, which could then subtract the noise
    connect_timeout_s: float = Field(15.0, gt=0)  # to reach the cloud at session start
    reply_timeout_s: float = Field(600.0, gt=0)  # longest wait for one cloud message
    max_message_mb: int = Field(MAX_MESSAGE_MB, ge=4)
    tls_ca: Path | None = None  # PEM CA that signed the cloud's certificate: speak TLS to the cloud
    tls_cert: Path | None = None  # PEM client certificate, for a cloud that requires mTLS
    tls_key: Path | None = None  # PEM private key of tls_cert
    token_file: Path | None = None  # file holding this device's token (else $DLORA_TOKEN; never a flag value)
    progress: bool = True
    device: Device = "cpu"  # this device's compute: edge parts + LoRA (train), the model (local-train)
    dtype: Dtype = "float32"  # local-train: the frozen base's dtype
    # Kill-and-Revive (DESIGN.md); defaults follow the paper's Table 6
    warmup_epochs: int = Field(1, ge=0)  # epochs with every module trainable
    budget: int | None = Field(None, ge=1)  # active modules after warm-up; None = all layers
    revive: int = Field(0, ge=0)  # modules swapped per later epoch
    kill_threshold: float | None = Field(None, gt=0)  # Early-Kill: kill Δ < τ·mean(Δ)
    kill_mode: KillMode = "detached"  # what a killed module costs: frozen | detached | dropped

    @field_validator("wire", "wire_up", "wire_down")
    @classmethod
    def _known_wire(cls, v: str | None) -> str | None:
        if v is not None and v not in WIRE_CODECS:
            raise ValueError(f"use one of {', '.join(WIRE_CODECS)}")
        return v

    @model_validator(mode="after")
    def _noise_has_clip(self) -> TrainConfig:
        for noise, clip in (("privacy_noise", "privacy_clip"), ("grad_noise", "grad_clip")):
            if getattr(self, noise) > 0 and getattr(self, clip) is None:
                a, b = "--" + noise.replace("_", "-"), "--" + clip.replace("_", "-")
                raise ValueError(f"{a}={getattr(self, noise):g} needs {b} C: the noise is sigma x C per coordinate "
                                 f"of each token row clipped to norm C; pass {b} or drop {a}")
        return self

    @property
    def codec_up(self) -> str:
        return self.wire_up or self.wire

    @property
    def codec_down(self) -> str:
        return self.wire_down or self.wire


class AttackConfig(_Frozen):
    """`dlora attack`'s own settings (the victim's training settings are a TrainConfig)."""

    public: Path  # JSONL of the attacker's own text (another public source): the shadow session that trains the probes
    victim_items: int = Field(16, ge=2)  # first lines of --data the victim trains on (what the cloud records)
    heldout_items: int = Field(32, ge=1)  # the next lines: the victim's held-out text, scoring the stolen adapter only
    public_items: int = Field(96, ge=16)  # lines of --public the shadow session sends (more text: stronger probes)
    mlp_steps: int = Field(200, ge=0)  # AdamW steps of each MLP probe; 0: ridge and nearest row only
    mlp_every: int = Field(8, ge=1)  # the MLP probe runs on whole-model tensors and on every Nth layer (+ first, last)
    keep_recording: bool = False  # keep the cloud's recording in --output (it holds the victim's text, in effect)


def field_default(config: type[BaseModel], name: str) -> Any:
    """The default a config gives a field: what a flag left unset means, and what its --help says."""
    return config.model_fields[name].default


def check_int8_block_size(n: int) -> int:
    """--int8-block-size for the commands without a TrainConfig (eval, bench): n, checked.

    Raises:
        ConfigError: n is not in 1..MAX_BLOCK_SIZE.
    """
    if n < 1:
        raise ConfigError(f"--int8-block-size={n}: must be >= 1")
    if n > MAX_BLOCK_SIZE:
        raise ConfigError(f"--int8-block-size={n}: must be <= {MAX_BLOCK_SIZE} (what a receiver accepts)")
    return n


def flag_error(error: ValidationError) -> ConfigError:
    """One line naming the first bad flag, its value and what is allowed."""
    first = error.errors()[0]
    if not first["loc"]:  # a model validator's: its message names the flags itself
        return ConfigError(first["msg"].removeprefix("Value error, "))
    field = str(first["loc"][0])
    flag = "--" + field.removesuffix("_s").replace("_", "-")
    msg = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"{flag}={first.get('input')!r}: {msg}")
