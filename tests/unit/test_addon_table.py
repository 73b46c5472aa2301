"""worker/addons/__init__.py's ADDONS table: model_type -> "module:Class", imported on first use."""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import worker.addons
from worker.addons import ADDONS, addon_class
from worker.addons.base import VisionAddOn


@pytest.mark.parametrize("model_type", sorted(ADDONS))
def test_each_entry_is_the_class_of_its_family(model_type):
    cls = addon_class(model_type)
    assert inspect.isclass(cls) and issubclass(cls, VisionAddOn), ADDONS[model_type]
    assert cls.family == model_type, f"{ADDONS[model_type]} has family {cls.family!r}"


def test_every_family_class_is_in_the_table():
    """A VisionAddOn subclass with a family, defined in a module of worker/addons/, has its line in ADDONS."""
    found = {}
    for info in pkgutil.iter_modules(worker.addons.__path__):
        mod = importlib.import_module(f"worker.addons.{info.name}")
        for obj in vars(mod).values():
            if inspect.isclass(obj) and obj.__module__ == mod.__name__ and issubclass(obj, VisionAddOn) and obj.family:
                found[obj.family] = f"{info.name}:{obj.__name__}"
    assert found == ADDONS


def test_no_addon_for_an_unknown_type():
    assert addon_class("llama") is None


def test_a_text_model_loads_without_mlx_vlm_or_a_family(llama_dir):
    """Loading a text model imports neither mlx-vlm nor any add-on family (the table imports lazily)."""
    code = ("import sys\nfrom worker.loading.model import load\nfrom worker.protocol import LoadOptions\n"
            f"load({str(llama_dir)!r}, LoadOptions(), lambda f: None)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'mlx_vlm' or m.startswith('worker.addons.'))\n"
            "assert not bad, bad\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
