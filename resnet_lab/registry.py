"""One registry mechanism for models, datasets and optimizers: a decorator and a dict."""

from typing import Callable, Dict

from resnet_lab.errors import UserError, closest


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str = None):
        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            return fn

        return add

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise UserError(
                f"unknown {self.kind} {name!r}{closest(name, self._entries)}; "
                f"choose from: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self):
        return sorted(self._entries)
