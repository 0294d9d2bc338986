"""lora_audit.startup: the collector held while a CLI process loads its libraries, frozen and enabled
again when the work begins (or after HOLD_SECONDS); never held for a caller running the CLI in its
own process, and never touched for a library caller."""

import gc
import subprocess
import sys

from lora_audit import startup


def test_hold_and_release():
    assert gc.isenabled() and not startup.held()
    try:
        startup.hold()
        assert not gc.isenabled() and startup.held()
        startup.hold()  # idempotent
        startup.release()
        assert gc.isenabled() and not startup.held()
        assert gc.get_freeze_count() > 0
        startup.release()  # a second release, or one without a hold, changes nothing
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_release_without_hold_leaves_a_library_callers_collector_alone():
    gc.disable()
    try:
        startup.release()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_in_process_cli_run_does_not_hold(tmp_path):
    from lora_audit.cli import main

    try:
        main(["--version"])
    except SystemExit:
        pass
    assert gc.isenabled() and not startup.held()


def _python(code: str) -> str:
    """What a fresh interpreter running ``code`` prints (its collector untouched by this test process)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_the_timer_releases_a_hold_nobody_released():
    assert _python("import gc, time; from lora_audit import startup; startup.HOLD_SECONDS = 0.2; startup.hold(); "
                   "assert not gc.isenabled(); time.sleep(1.0); assert gc.isenabled() and not startup.held(); "
                   "print('ok')") == "ok"


def test_a_stage_a_bar_or_the_engine_releases_it():
    code = ("import gc; from lora_audit import startup, progress\n"
            "for begin in (lambda: progress.stage('x'), lambda: progress.progress(total=1, desc='x').close()):\n"
            "    startup.hold(); assert not gc.isenabled(); begin(); assert gc.isenabled() and not startup.held()\n"
            "import torch; from lora_audit.checkpoints.deltas import LowRank, MatrixGroup\n"
            "from lora_audit.spectral.engine import audit\n"
            "startup.hold()\n"
            "audit([MatrixGroup('w', torch.randn(8, 6), [LowRank(torch.randn(8, 2), torch.randn(2, 6), 1.0)])], progress=False)\n"
            "assert gc.isenabled() and not startup.held(); print('ok')")
    assert _python(code) == "ok"


def test_the_console_script_holds_it_and_a_command_without_work_keeps_it_held():
    code = ("import gc, sys; from lora_audit import startup, cli\n"
            "sys.argv = ['lora-audit', '--version']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(startup.held(), gc.isenabled())")
    assert _python(code).split()[-2:] == ["True", "False"]
