"""Saving under failure (issue #14): a killed save, a read-only target and a full target, in every framework.

Each framework's ``save_pretrained`` runs in a child process that saves a bigger model over an existing
tiny checkpoint. The child first meets a full target (``RLIMIT_FSIZE`` with SIGXFSZ ignored, so a write
fails with EFBIG) and a read-only one (mode 0555; as root, which writes anyway, the child drops its
effective uid to nobody for that save), reporting the errors; then it saves once more and pauses
deterministically mid-write (its staged ``model.safetensors`` handle stops after N bytes, or the commit
stops before its first rename) and says so; the parent SIGKILLs it there. After all of it the old
checkpoint must be intact, bit for bit, and loadable; nothing may have been written outside the target;
a killed save's temporaries (hidden ``.NAME.trivit-PID-*.tmp`` files, which no loader reads) are removed
by the next save. The conversion writers (tf_model.h5, flax_model.msgpack, ``convert_to``) are checked
the same way in the Flax child.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
            patch_size=8, encoder_stride=8, num_labels=3)
BIGGER = dict(TINY, hidden_size=64, num_hidden_layers=4, intermediate_size=128)  # ~1 MB of weights
#: The full target: files may not grow past this (the tiny config.json fits, the weights do not).
FSIZE_LIMIT = 64 * 1024
#: The child stops writing its staged model.safetensors after this many bytes, then waits to be killed.
KILL_AFTER_BYTES = 200 * 1024
TEMP = re.compile(r"^\.(config\.json|model\.safetensors|tf_model\.h5|flax_model\.msgpack)\.trivit-(\d+)-\w+\.tmp$")

CHILD = textwrap.dedent(r"""
    import errno, json, os, resource, signal, sys, time
    from pathlib import Path

    fw, target, stage, bigger = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    fsize_limit, kill_after = int(sys.argv[5]), int(sys.argv[6])
    from vit_core.config import ViTConfig
    config = ViTConfig(**bigger)
    if fw == "pt":
        import vit_torch
        model = vit_torch.ViTForImageClassification(config)
    elif fw == "tf":
        import vit_tf
        model = vit_tf.TFViTForImageClassification(config)
    else:
        import vit_flax
        model = vit_flax.FlaxViTForImageClassification(config)
    saves = {"save_pretrained": lambda: model.save_pretrained(target)}
    if fw == "flax":  # the conversion writers, over the same folder, and convert_to into a new one beside it
        from conversion import convert_to, read_source, write_flax_msgpack, write_tf_h5
        model.save_pretrained(target.parent.parent / "bigger")
        _, conv = read_source(target.parent.parent / "bigger")
        saves["write_tf_h5"] = lambda: write_tf_h5(target, conv.state.loaders(), conv.config, conv.model_class)
        saves["write_flax_msgpack"] = lambda: write_flax_msgpack(target, conv.state.loaders(), conv.config,
                                                                 conv.model_class)
        saves["convert_to"] = lambda: convert_to(conv, target.parent / "converted", "tf-h5")

        def cli():  # trivit convert: exit 2 and one error line (reported as [kind, exit status, stderr])
            import contextlib, io
            from trivit.cli import main
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(["convert", str(target.parent.parent / "bigger"), str(target.parent / "converted")])
            return ["cli", rc, err.getvalue()]
        saves["trivit convert"] = cli

    def attempt(save):
        try:
            return save() or "saved"
        except OSError as e:
            return [type(e).__name__, e.errno, str(e)]

    report = {}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE then fails with EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for name, save in saves.items():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, hard))
        try:
            report[f"full {name}"] = attempt(save)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    os.chmod(target, 0o555)
    root = os.geteuid() == 0
    if root:  # root writes into 0555 folders anyway: save as nobody
        os.setegid(65534)
        os.seteuid(65534)
    try:
        report["read-only save_pretrained"] = attempt(saves["save_pretrained"])
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)
        os.chmod(target, 0o755)
    print("REPORT " + json.dumps(report), flush=True)

    import vit_core.atomic as atomic

    def pause(where):
        print(f"PAUSED {where}", flush=True)
        time.sleep(600)

    if stage == "mid-write":
        open_temp = atomic._open_temp

        def pausing(folder, name):
            tmp, fh = open_temp(folder, name)
            if name != "model.safetensors":
                return tmp, fh

            class Pausing:
                written = 0

                def write(self, data):
                    n = fh.write(data)
                    Pausing.written += memoryview(data).nbytes
                    if Pausing.written >= kill_after:
                        fh.flush()
                        pause(f"{tmp} after {Pausing.written} bytes")
                    return n

                def __getattr__(self, attr):
                    return getattr(fh, attr)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    fh.close()

            return tmp, Pausing()

        atomic._open_temp = pausing
    else:  # before-commit: every staged file complete, none renamed yet
        replace = atomic.os.replace
        atomic.os.replace = lambda src, dst: pause(f"before renaming {src}") or replace(src, dst)
    model.save_pretrained(target)
    print("NOT KILLED", flush=True)
""")


def _old_checkpoint(folder: Path) -> dict[str, bytes]:
    """The tiny checkpoint saved by vit_torch; returns every file's bytes."""
    import torch

    import vit_torch
    from vit_core.config import ViTConfig

    torch.manual_seed(0)
    vit_torch.ViTForImageClassification(ViTConfig(**TINY)).save_pretrained(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_intact(folder: Path, old: dict[str, bytes]) -> None:
    """The old files, bit for bit, and loadable: the tensors read back equal the saved ones exactly."""
    import torch

    import vit_torch
    from vit_core.checkpoint import read_checkpoint

    for name, data in old.items():
        assert (folder / name).read_bytes() == data, f"{name} changed"
    model = vit_torch.ViTForImageClassification.from_pretrained(folder)
    state = read_checkpoint(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(v, torch.from_numpy(np.array(state[k]))), k


def _run_child(fw: str, target: Path, stage: str) -> tuple[dict, str, int]:
    """Start the child, collect its error report, SIGKILL it where it pauses; returns (report, pause line, pid)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, fw, str(target), stage, json.dumps(BIGGER), str(FSIZE_LIMIT),
         str(KILL_AFTER_BYTES)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    report, paused, lines = None, None, []
    try:
        for line in child.stdout:
            lines.append(line)
            if line.startswith("REPORT "):
                report = json.loads(line[len("REPORT "):])
            elif line.startswith("PAUSED "):
                paused = line.strip()
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
        err = child.stderr.read()
    assert paused is not None and report is not None, f"{fw} child output {lines}, stderr {err[-3000:]}"
    assert child.returncode == -signal.SIGKILL
    return report, paused, child.pid


CASES = [("pt", "mid-write"), ("pt", "before-commit"), ("tf", "mid-write"), ("flax", "mid-write")]


@pytest.fixture(scope="module")
def killed_saves():
    """Every case's child, run at the same time (each pays its framework's import): ``{case: (folder, old
    files, parent listing before, report, pause line, child pid)}``. The folders are world-traversable: the
    read-only save runs as nobody when the tests run as root."""
    base = Path(tempfile.mkdtemp(prefix="trivit-save-"))
    base.chmod(0o755)
    try:
        setups = {}
        for fw, stage in CASES:
            target = base / f"{fw}-{stage}" / "ckpts" / "old"
            old = _old_checkpoint(target)
            setups[fw, stage] = (target, old, _listing(target.parent))
        with ThreadPoolExecutor(len(CASES)) as pool:
            runs = {case: pool.submit(_run_child, case[0], setups[case][0], case[1]) for case in CASES}
            results = {case: (*setups[case], *run.result(timeout=600)) for case, run in runs.items()}
        yield results
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("fw, stage", CASES)
def test_save_survives_kill_full_and_read_only(killed_saves, fw, stage):
    target, old, before, report, paused, pid = killed_saves[fw, stage]
    parent = target.parent
    print(fw, stage, paused, json.dumps(report, indent=1))

    # full target and read-only target: an OSError naming the file and the cause; nothing else changed
    for what, outcome in report.items():
        assert outcome != "saved", f"{what}: the save succeeded"
        kind, code, message = outcome
        if kind == "cli":
            assert code == 2 and message.startswith("trivit convert: error: ") and "cannot convert into" in message and (
                "File too large" in message and str(parent / "converted") in message and "Traceback" not in message
            ), message
            continue
        if what.startswith("full"):
            assert code == 27 and "File too large" in message and "ulimit -f" in message, (what, message)
        else:
            assert kind == "PermissionError" and "Permission denied" in message, (what, message)
        where = str(parent / "converted") if what == "full convert_to" else str(target)
        assert where in message and ("cannot convert" if what == "full convert_to" else "cannot save") in message, (
            what, message)

    # killed mid-write: the old checkpoint is intact; only hidden temporaries of the dead child are new
    assert _listing(parent) == before, "something was written outside the target folder"
    extra = sorted(set(_listing(target)) - set(old))
    assert extra and all((m := TEMP.match(n)) and int(m[2]) == pid for n in extra), extra
    _assert_intact(target, old)

    # the next save removes them (and replaces the checkpoint as usual)
    import vit_torch
    from vit_core.config import ViTConfig

    vit_torch.ViTForImageClassification(ViTConfig(**BIGGER)).save_pretrained(target)
    assert _listing(target) == sorted(old) and _listing(parent) == before


def test_stale_conversion_staging_is_removed(tmp_path):
    """A killed ``convert_to`` leaves its hidden staging folder beside DST; the next conversion to DST removes
    it (a live process's, or another DST's, is left alone)."""
    from conversion import convert_to, read_source

    _old_checkpoint(tmp_path / "src")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".dst.trivit-{pid}-abc.tmp"
    live = tmp_path / f".dst.trivit-{os.getpid()}-abc.tmp"
    other = tmp_path / f".other.trivit-{pid}-abc.tmp"
    for d in (stale, live, other):
        (d / "junk").mkdir(parents=True)
    _, conv = read_source(tmp_path / "src")
    convert_to(conv, tmp_path / "dst")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "dst" / "model.safetensors").is_file()
