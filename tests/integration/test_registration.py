"""Registration with DeepSpeed never breaks ``import deepspeed``: a DeepSpeed release without a
method we wrap (renamed, removed) gets one warning naming its version and what is missing, and is
left importable and unpatched; a release outside the tested range gets a warning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

deepspeed = pytest.importorskip("deepspeed")

from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

import deepspeed_cdadam.integration.deepspeed as integration  # noqa: E402
from tests.launch import ROOT  # noqa: E402

# Run in a fresh interpreter: deepspeed_cdadam is imported first (as user programs do), and the
# DeepSpeed engine module loses `_configure_basic_optimizer` the moment it is executed, before our
# registration (which runs inside `import deepspeed`) sees it: a future release that renamed it.
RENAMED_METHOD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys, warnings

    class RenameOnLoad(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "deepspeed.runtime.engine":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_then_rename(module):
                exec_module(module)
                engine = module.DeepSpeedEngine
                engine._configure_basic_optimizer_v2 = engine._configure_basic_optimizer
                del engine._configure_basic_optimizer

            spec.loader.exec_module = exec_then_rename
            return spec

    sys.meta_path.insert(0, RenameOnLoad())
    import deepspeed_cdadam  # registers when deepspeed's engine module loads
    import deepspeed_cdadam.integration.deepspeed as integration

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
        assert integration.register() is False  # still missing; no second warning
    ours = [str(w.message) for w in caught if "deepspeed_cdadam" in str(w.message)]
    assert len(ours) == 1, ours
    print("WARNING:", ours[0])
    assert not hasattr(DeepSpeedEngine, integration._PATCH_MARK)
    assert DeepSpeedEngine._configure_optimizer.__module__ == "deepspeed.runtime.engine"  # unpatched
    assert DeepSpeedEngine.load_checkpoint.__module__ == "deepspeed.runtime.engine"
    print("IMPORTED", deepspeed.__version__)
    """
)


def test_a_deepspeed_without_a_wrapped_method_stays_importable_and_unpatched():
    out = subprocess.run(
        [sys.executable, "-c", RENAMED_METHOD_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    warning = next(line for line in out.stdout.splitlines() if line.startswith("WARNING:"))
    assert f"DeepSpeed {deepspeed.__version__}" in warning
    assert "DeepSpeedEngine._configure_basic_optimizer" in warning
    assert "not registered" in warning
    assert f"IMPORTED {deepspeed.__version__}" in out.stdout


IMPORT_ORDER_SCRIPT = textwrap.dedent(
    """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import deepspeed_cdadam  # first, as the README allows
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.pipe.engine import PipelineEngine
    assert not [str(w.message) for w in caught if "deepspeed_cdadam" in str(w.message)]
    import deepspeed_cdadam.integration.deepspeed as integration
    assert hasattr(DeepSpeedEngine, integration._PATCH_MARK)
    assert DeepSpeedEngine._configure_basic_optimizer.__module__ == integration.__name__
    assert PipelineEngine.__init__.__module__ == integration.__name__
    print("REGISTERED", deepspeed.__version__)
    """
)


def test_importing_us_before_deepspeed_registers_on_every_tested_release():
    """DeepSpeed 0.19.6 loads its engine module before its pipeline engine module; 0.19.7+ loads the
    pipeline engine first, which imports the engine: registration waits until both exist."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ORDER_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert f"REGISTERED {deepspeed.__version__}" in out.stdout


@pytest.fixture
def unregistered(monkeypatch):
    """DeepSpeed unpatched and no warning given yet; registered again afterwards."""
    integration.unregister()
    monkeypatch.setattr(integration, "_warned", set())
    yield
    monkeypatch.undo()
    integration.unregister()
    assert integration.register()


def test_compatibility_check_names_every_missing_method(unregistered):
    class FakeEngine:  # a DeepSpeedEngine of some future release
        def load_checkpoint(self, load_dir, tag=None):
            pass

    problems = integration.compatibility_problems({"DeepSpeedEngine": FakeEngine, "PipelineEngine": FakeEngine})
    assert "DeepSpeedEngine._configure_basic_optimizer" in " ".join(problems)
    assert "DeepSpeedEngine.load_checkpoint has no parameter 'load_optimizer_states'" in " ".join(problems)
    assert integration.compatibility_problems(integration.deepspeed_classes()) == []


def test_any_failure_while_patching_leaves_deepspeed_unpatched_with_one_warning(unregistered, monkeypatch):
    original = DeepSpeedEngine._configure_optimizer

    def broken(classes):
        raise RuntimeError("something DeepSpeed changed")

    monkeypatch.setattr(integration, "_patch", broken)
    with pytest.warns(RuntimeWarning, match="RuntimeError: something DeepSpeed changed") as caught:
        assert integration.register() is False
        assert integration.register() is False
    assert len([w for w in caught if "deepspeed_cdadam" in str(w.message)]) == 1
    assert DeepSpeedEngine._configure_optimizer is original and not hasattr(DeepSpeedEngine, integration._PATCH_MARK)


def test_a_deepspeed_outside_the_tested_range_is_warned_about_once_and_registered(unregistered, monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    with pytest.warns(RuntimeWarning, match=r"tested with DeepSpeed 0\.19\.6 - 0\.19\.8; this is DeepSpeed 0\.20\.1"):
        assert integration.register()
    assert hasattr(DeepSpeedEngine, integration._PATCH_MARK)
    integration.unregister()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second registration does not warn again
        assert integration.register()


def test_the_tested_range_is_stated():
    assert integration.SUPPORTED_DEEPSPEED_VERSIONS == ("0.19.6", "0.19.8")
    assert integration.version_is_tested(deepspeed.__version__)
