"""Fake ``modules.scripts``: the Script base class and the runner's hook protocol.

``ScriptRunner`` calls each always-on script's hook with ``p.script_args[args_from:args_to]``
and reports (does not raise) exceptions, as the WebUI does.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import namedtuple

from . import errors

AlwaysVisible = object()

ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None
    create_group = True

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        pass


class ScriptRunner:
    def __init__(self):
        self.alwayson_scripts: list = []
        self.inputs = [None]

    def add(self, script, n_args):
        script.args_from = len(self.inputs)
        self.inputs.extend([None] * n_args)
        script.args_to = len(self.inputs)
        script.alwayson = True
        self.alwayson_scripts.append(script)

    def _each(self, method, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            fn = getattr(script, method, None)
            if fn is None:
                continue
            try:
                fn(p, *args, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._each("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess_image(self, p, pp):
        for script in self.alwayson_scripts:
            fn = getattr(script, "postprocess_image", None)
            if fn is None:
                continue
            try:
                fn(p, pp, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report("Error running postprocess_image", exc_info=True)

    def postprocess(self, p, processed):
        for script in self.alwayson_scripts:
            try:
                script.postprocess(p, processed, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report("Error running postprocess", exc_info=True)


def load_script(path: str, root: str):
    """Import a ``scripts/*.py`` file as the WebUI does: named by its basename, not in sys.modules,
    with the extension root prefixed to ``sys.path`` during the import."""
    name = os.path.basename(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, root)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Script) and v is not Script]
    for cls in classes:
        scripts_data.append(ScriptClassData(cls, path, root, module))
    return module, classes
