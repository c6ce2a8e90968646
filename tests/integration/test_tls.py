"""TLS between device and cloud, with certificates from `dlora-cloud tls init`: real gRPC servers on
127.0.0.1 port 0 (the `cloud` fixture), real handshakes, the real command lines."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cloud_server.cli import _parser as cloud_parser
from cloud_server.cli import main as cloud_main
from cloud_server.cli import serve_config
from cloud_server.tls_init import init_dir
from common.config import TrainConfig
from common.errors import ConfigError, RemoteError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.tls import client_tls
from edge_client.app.cli import main as dlora_main
from edge_client.remote.link import CloudLink, LinkConfig
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples
from edge_client.train.model_parts import EdgeModel


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two independent sets from tls init: `good` (the cloud's) and `other` (another CA, another client)."""
    root = tmp_path_factory.mktemp("pki")
    return {name: init_dir(root / name, ["127.0.0.1", "cloud.example.org"])["ca.pem"].parent
            for name in ("good", "other")}


def tls_cloud(cloud, model_dir: Path, certs: Path, mtls: bool = False, **kw: object) -> str:
    return cloud(model_dir, tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                 tls_client_ca=certs / "ca.pem" if mtls else None, **kw)


def open_link(address: str, model_dir: Path, ca: Path | None, cert: Path | None = None, key: Path | None = None,
              timeout_s: float = 15.0) -> tuple[CloudLink, float]:
    """A link opened to `address` (or the error it raised) and how long opening took."""
    link = CloudLink(LinkConfig(address=address, codec_up="float32", codec_down="float32",
                                tls=client_tls(ca, cert, key), connect_timeout_s=timeout_s), EdgeModel(model_dir))
    t0 = time.monotonic()
    try:
        link.open()
    finally:
        elapsed = time.monotonic() - t0
    return link, elapsed


def refused(address: str, model_dir: Path, ca: Path | None, cert: Path | None = None, key: Path | None = None) -> str:
    """The one-line reason opening a link fails; it must come at once, not after the 15 s connect timeout."""
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as info:
        open_link(address, model_dir, ca, cert, key)
    assert time.monotonic() - t0 < 5.0, "a TLS mismatch must fail at once, not wait for --connect-timeout"
    assert "\n" not in str(info.value)
    return str(info.value)


def test_tls_init_writes_a_verifying_set(pki):
    """tls init's server certificate is signed by its CA, names every --host (DNS names as DNSName, addresses
    as IPAddress) plus localhost/127.0.0.1/::1, is for server auth; the client certificate is signed by the
    same CA for client auth; keys are 0600 in a 0700 folder, and an existing set is not overwritten."""
    d = pki["good"]
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    client = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"cloud.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("::1")}
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert (d.stat().st_mode & 0o777) == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()} == {
        "ca.pem": 0o644, "server.pem": 0o644, "client.pem": 0o644, "server.key": 0o600, "client.key": 0o600}
    with pytest.raises(ConfigError, match="already holds .*--force"):
        init_dir(d, ["127.0.0.1"])
    for bad in ("0.0.0.0", "cloud:50051", "https://cloud", "two words"):
        with pytest.raises(ConfigError, match="--host"):
            init_dir(d / "x", [bad])


def test_tls_init_command(tmp_path, capsys):
    """`dlora-cloud tls init DIR --host ...` through the real command line: exit 0, prints where each file goes;
    again without --force: exit 2 and one line."""
    assert cloud_main(["tls", "init", str(tmp_path / "c"), "--host", "10.0.0.7", "--host", "dlora.lan"]) == 0
    out = capsys.readouterr().out
    assert "--tls-cert" in out and "--tls-ca" in out and "--tls-client-ca" in out
    assert cloud_main(["tls", "init", str(tmp_path / "c"), "--host", "10.0.0.7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlora-cloud: error:") and "--force" in err and "\n" not in err
    assert cloud_main(["tls", "init", str(tmp_path / "c"), "--host", "10.0.0.8", "--force"]) == 0


def _step_loss(cfg: TrainConfig, data_file: Path) -> float:
    engine = SplitEngine(cfg)
    try:
        batch = collate(load_examples(data_file, engine.tokenizer, 64)[:6], engine.tokenizer.pad_token_id)
        torch.manual_seed(0)
        loss, _ = engine.train_step(batch, 0, [pb.FORWARD_BACKWARD] * engine.num_layers)
        grads = [p.grad.clone() for p in engine.parameters()]
    finally:
        engine.close()
    return loss, grads


def test_training_step_over_tls_equals_plaintext(tiny_dir, cloud, pki, data_file, tmp_path):
    """A full split training step over TLS gives exactly the plaintext run's loss and LoRA gradients:
    TLS changes the transport, never a byte of what the two sides compute."""
    model_dir = tiny_dir("llama")
    base = dict(model=model_dir, data=data_file, output=tmp_path, progress=False, lora_dropout=0.0)
    plain_loss, plain_grads = _step_loss(TrainConfig(cloud=cloud(model_dir), **base), data_file)
    tls_loss, tls_grads = _step_loss(TrainConfig(cloud=tls_cloud(cloud, model_dir, pki["good"]),
                                                 tls_ca=pki["good"] / "ca.pem", **base), data_file)
    assert tls_loss == plain_loss
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, tls_grads, strict=True))


def test_tls_mismatches_are_refused_at_once_with_the_flag_to_fix(tiny_dir, cloud, pki):
    """A plaintext client against the TLS cloud, a client trusting another CA, a TLS client against a plaintext
    cloud, and a name the certificate does not hold: each refused within seconds, with one line naming the flag."""
    model_dir = tiny_dir("llama")
    address = tls_cloud(cloud, model_dir, pki["good"])
    assert "serves TLS and this device spoke plaintext: pass --tls-ca" in refused(address, model_dir, None)
    assert "not signed by --tls-ca" in refused(address, model_dir, pki["other"] / "ca.pem")
    assert "does not speak TLS" in refused(cloud(model_dir), model_dir, pki["good"] / "ca.pem")
    port = address.rsplit(":", 1)[1]
    other_name = tls_cloud(cloud, model_dir, pki["good"], host="127.0.0.2")  # its certificate names 127.0.0.1 only
    assert "does not name 127.0.0.2" in refused(f"127.0.0.2:{other_name.rsplit(':', 1)[1]}", model_dir,
                                                pki["good"] / "ca.pem")
    link, _ = open_link(f"localhost:{port}", model_dir, pki["good"] / "ca.pem")  # localhost: always in the set
    link.close()


def test_a_peer_that_hangs_up_is_not_called_a_tls_mismatch(tiny_dir, pki):
    """A listener that accepts and closes at once (a TCP proxy whose cloud is down) looks to gRPC like a TLS
    cloud does to a plaintext device; the link does not misname it: it keeps trying for --connect-timeout and
    then says it cannot reach the cloud, with TLS and without."""
    model_dir = tiny_dir("llama")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hang_up() -> None:
        while not stop.is_set():
            conn, _ = listener.accept()
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        for ca in (None, pki["good"] / "ca.pem"):
            with pytest.raises(RemoteError, match="cannot reach dlora-cloud") as info:
                open_link(address, model_dir, ca, timeout_s=1.5)
            assert "TLS" not in str(info.value)
    finally:
        stop.set()
        listener.close()


def test_mtls_needs_a_client_certificate_signed_by_the_clients_ca(tiny_dir, cloud, pki):
    """Under mTLS a device without a certificate, or with one from another CA, is refused with one line; the
    device with tls init's client certificate opens a session."""
    model_dir = tiny_dir("llama")
    address = tls_cloud(cloud, model_dir, pki["good"], mtls=True)
    ca = pki["good"] / "ca.pem"
    assert "requires a client certificate" in refused(address, model_dir, ca)
    assert "refused this device's certificate" in refused(address, model_dir, ca, pki["other"] / "client.pem",
                                                          pki["other"] / "client.key")
    link, _ = open_link(address, model_dir, ca, pki["good"] / "client.pem", pki["good"] / "client.key")
    assert link.session_id
    link.close()


def test_health_over_tls_through_the_cli(tiny_dir, cloud, pki, capsys):
    """`dlora-cloud health --tls-ca` answers SERVING over TLS; under mTLS it needs the client certificate like
    every call (without one: exit 1 and the line saying so); plaintext against TLS says to pass --tls-ca."""
    model_dir = tiny_dir("llama")
    ca, good = str(pki["good"] / "ca.pem"), pki["good"]
    address = tls_cloud(cloud, model_dir, good)
    assert cloud_main(["health", "--address", address, "--tls-ca", ca]) == 0
    assert capsys.readouterr().out.startswith("SERVING")
    assert cloud_main(["health", "--address", address]) == 1
    assert "pass --tls-ca" in capsys.readouterr().err
    mtls = tls_cloud(cloud, model_dir, good, mtls=True)
    assert cloud_main(["health", "--address", mtls, "--tls-ca", ca]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dlora-cloud")]
    assert len(lines) == 1 and "requires a client certificate" in lines[0]
    assert cloud_main(["health", "--address", mtls, "--tls-ca", ca, "--tls-cert", str(good / "client.pem"),
                       "--tls-key", str(good / "client.key")]) == 0
    assert capsys.readouterr().out.startswith("SERVING")


def test_dlora_train_plaintext_against_tls_fails_clearly(tiny_dir, cloud, pki, data_file, tmp_path, capsys):
    """`dlora train` without --tls-ca against a TLS cloud exits 3 at once with one line saying to pass --tls-ca."""
    model_dir = tiny_dir("llama")
    address = tls_cloud(cloud, model_dir, pki["good"])
    t0 = time.monotonic()
    code = dlora_main(["train", "--cloud", address, "--model", str(model_dir), "--data", str(data_file),
                       "--output", str(tmp_path / "o"), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dlora")]
    assert code == 3 and len(err) == 1 and "pass --tls-ca" in err[0] and time.monotonic() - t0 < 10


def test_dlora_eval_over_mtls(tiny_dir, cloud, pki, tmp_path, capsys):
    """`dlora eval --tls-ca --tls-cert --tls-key` scores items through a cloud serving mTLS, through the real CLI."""
    model_dir, good = tiny_dir("llama"), pki["good"]
    address = tls_cloud(cloud, model_dir, good, mtls=True)
    data = tmp_path / "items.jsonl"
    data.write_text('{"prompt": "The sky is", "choices": [" blue", " green"], "answer": 0}\n')
    assert dlora_main(["eval", "--cloud", address, "--model", str(model_dir), "--data", str(data), "--no-progress",
                       "--tls-ca", str(good / "ca.pem"), "--tls-cert", str(good / "client.pem"),
                       "--tls-key", str(good / "client.key")]) == 0
    assert "accuracy" in capsys.readouterr().out


def _serve_args(*argv: str) -> object:
    return cloud_parser().parse_args(["serve", "--model", "unused", *argv])


def test_serving_off_loopback_needs_tls_or_insecure(tiny_dir, pki, capsys):
    """`dlora-cloud serve --host 0.0.0.0` without TLS exits 2 with one line before any model is loaded (the
    model folder does not even exist); with --insecure, or with TLS, the config is accepted; loopback needs
    neither."""
    assert cloud_main(["serve", "--model", "/nonexistent", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlora-cloud: error: --host 0.0.0.0 is not a loopback address") and "\n" not in err
    assert "--tls-cert" in err and "--insecure" in err
    assert serve_config(_serve_args("--host", "0.0.0.0", "--insecure")).insecure
    good = pki["good"]
    cfg = serve_config(_serve_args("--host", "0.0.0.0", "--tls-cert", str(good / "server.pem"),
                                   "--tls-key", str(good / "server.key"), "--tls-client-ca", str(good / "ca.pem")))
    assert cfg.tls_client_ca == good / "ca.pem"
    assert serve_config(_serve_args("--host", "127.0.0.1")).tls_cert is None


def test_bad_tls_files_are_one_line_naming_the_flag(pki, tmp_path):
    """Missing, not PEM, a key that is not the certificate's, half a pair, and client flags without --tls-ca:
    each a ConfigError of one line naming the flag, on the cloud's side and on the device's."""
    good, other = pki["good"], pki["other"]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    serve_cases = [
        (("--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(good / "server.key")), "--tls-cert .*no such file"),
        (("--tls-cert", str(junk), "--tls-key", str(good / "server.key")), "--tls-cert .*not a PEM file"),
        (("--tls-cert", str(good / "server.pem"), "--tls-key", str(junk)), "--tls-key .*not a PEM file"),
        (("--tls-cert", str(good / "server.pem"), "--tls-key", str(other / "server.key")), "--tls-key .*is not the key"),
        (("--tls-cert", str(good / "server.pem")), "--tls-cert needs --tls-key"),
        (("--tls-client-ca", str(good / "ca.pem")), "--tls-client-ca needs --tls-cert"),
        (("--tls-cert", str(good / "server.pem"), "--tls-key", str(good / "server.key"), "--tls-client-ca", str(junk)),
         "--tls-client-ca .*not a PEM file"),
    ]
    for argv, pattern in serve_cases:
        with pytest.raises(ConfigError, match=pattern) as info:
            serve_config(_serve_args(*argv))
        assert "\n" not in str(info.value)
    client_cases = [
        ((tmp_path / "none.pem", None, None), "--tls-ca .*no such file"),
        ((junk, None, None), "--tls-ca .*not a PEM file"),
        ((None, good / "client.pem", good / "client.key"), "need --tls-ca"),
        ((good / "ca.pem", good / "client.pem", None), "--tls-cert needs --tls-key"),
        ((good / "ca.pem", good / "client.pem", other / "client.key"), "--tls-key .*is not the key"),
    ]
    for (ca, cert, key), pattern in client_cases:
        with pytest.raises(ConfigError, match=pattern) as info:
            client_tls(ca, cert, key)
        assert "\n" not in str(info.value)
