"""A minimal stand-in for gradio 3.41's component constructors (records their arguments and nesting)."""

from __future__ import annotations

created: list = []
_open: list = []  # the blocks whose ``with`` is open, innermost last


class Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.children: list = []
        if _open:
            _open[-1].children.append(self)
        created.append(self)

    def __enter__(self):
        _open.append(self)
        return self

    def __exit__(self, *exc):
        _open.remove(self)
        return False


class Component(Block):
    def __init__(self, *args, value=None, label=None, elem_id=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.value, self.label, self.elem_id = value, label, elem_id


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, value=None, step=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Checkbox(Component):
    pass


class Number(Component):
    pass


class Dropdown(Component):
    def __init__(self, choices=None, value=None, multiselect=False, **kwargs):
        super().__init__(value=value, **kwargs)
        self.choices, self.multiselect = list(choices or []), multiselect


class Radio(Component):
    def __init__(self, choices=None, value=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.choices = list(choices or [])


class HTML(Component):
    pass


class Button(Component):
    """Records its click listeners: ``(fn, inputs, outputs)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clicks: list = []

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        self.clicks.append((fn, inputs, outputs))


def update(**kwargs):
    return {"__type__": "update", **kwargs}


class Row(Block):
    pass


class Column(Block):
    pass
