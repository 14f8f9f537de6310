"""heartbeat/runs.py: run numbering and the one-writer lock of a run folder (a live holder refuses a
second writer, a dead one's lock is taken over with a warning, another host's lock is refused)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from heartbeat.runs import LOCK, RunLock, TrainError, find_run, open_run, run_number


class _One:
    """Dist of a single process."""
    main, enabled, rank = True, False, 0

    def broadcast(self, obj):
        return obj

    def barrier(self):
        pass


def _holder(path, pid, host=None, proc_start=None):
    (path / LOCK).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                         "proc_start": proc_start, "started": "earlier"}))


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_holder_refuses_a_second_writer(tmp_path, sleeper):
    _holder(tmp_path, sleeper.pid)
    with pytest.raises(TrainError, match=rf"being written by another process: pid {sleeper.pid} on "
                                         rf"{socket.gethostname()}, started earlier"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == sleeper.pid      # untouched


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path):
    dead = _dead_pid()
    _holder(tmp_path, dead)
    said = []
    lock = RunLock(tmp_path, log=said.append).acquire()
    assert len(said) == 1 and "warning" in said[0] and f"pid {dead}" in said[0] and "is gone" in said[0]
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path, sleeper):
    """The pid runs, but another process than the one that took the lock (its start tick differs)."""
    _holder(tmp_path, sleeper.pid, proc_start="1")
    said = []
    RunLock(tmp_path, log=said.append).acquire().release()
    assert said and "is gone" in said[0]


def test_another_hosts_lock_is_refused_with_the_way_out(tmp_path):
    _holder(tmp_path, 12345, host="node-17")
    with pytest.raises(TrainError, match=rf"locked by pid 12345 on node-17.*delete {tmp_path / LOCK}"):
        RunLock(tmp_path).acquire()


def test_one_lock_per_folder_within_a_process_too(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(TrainError, match="another process"):   # our own pid is alive
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def test_open_run_numbers_locks_and_refuses(tmp_path, sleeper):
    from heartbeat.config import get_config
    cfg = get_config("tiny", ["--stage=vae", f"--out={tmp_path}"])
    a, lock_a = open_run(cfg, _One(), log=lambda *_: None)
    b, lock_b = open_run(cfg, _One(), log=lambda *_: None)
    assert (a.name, b.name) == ("000-vae-tiny", "001-vae-tiny") and (a / LOCK).exists()
    assert [run_number(p) for p in (a, b)] == [0, 1] and run_number(tmp_path / "x-vae-tiny") is None
    lock_a.release()
    lock_b.release()
    assert find_run(tmp_path, "vae", "tiny") is None            # no checkpoint in either
    # --force into a run folder that another process writes: refused before anything is deleted
    (a / "config.json").write_text(cfg.to_json())
    (a / "ckpt-0000001.safetensors").write_bytes(b"x")
    _holder(a, sleeper.pid)
    force = get_config("tiny", ["--stage=vae", f"--out={a}", "--force"])
    with pytest.raises(TrainError, match="another process"):
        open_run(force, _One(), log=lambda *_: None)
    assert (a / "ckpt-0000001.safetensors").exists()


def test_a_second_resume_of_a_running_run_is_refused(tmp_path, capsys):
    """Two processes: the first trains (slowly) and holds the lock; `--resume` of the same run is refused
    with one line naming the holder; after the first is killed, the resume takes the lock over."""
    from data_prep.phantom import build
    from tests.test_train import TINY, run
    from tools.train import main
    build(tmp_path / "echo", clips=2, frames=4, size=32, seed=0, progress=False)
    args = TINY + ["--stage=vae", f"--data={tmp_path / 'echo'}", f"--out={tmp_path / 'runs'}", "--batch_size=2",
                   "--ckpt_every=1"]
    run(*args, "--max_steps=1")
    run_dir = tmp_path / "runs" / "000-vae-tiny"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    slow = subprocess.Popen([sys.executable, "tools/train.py", f"--resume={run_dir}", "--stage=vae",
                             "--max_steps=100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if json.loads((run_dir / LOCK).read_text()).get("pid") == slow.pid:
                    break
            except (OSError, ValueError):
                pass
            assert slow.poll() is None and time.time() < deadline, slow.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        capsys.readouterr()
        assert main(["--stage=vae", f"--resume={run_dir}", "--max_steps=2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"being written by another process: pid {slow.pid}" in err
    finally:
        slow.kill()
        slow.wait()
    assert main(["--stage=vae", f"--resume={run_dir}", "--max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert f"warning: taking over the lock of {run_dir}" in out and f"pid {slow.pid}" in out
    assert not (run_dir / LOCK).exists()
