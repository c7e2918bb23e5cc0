"""A minimal stand-in for gradio 3.41's component constructors (records their arguments)."""

from __future__ import annotations

created: list = []


class Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
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


class Row(Block):
    pass


class Column(Block):
    pass
