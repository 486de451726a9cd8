"""The method registry: every training method compinv knows, by name.

Adding a method (or a model family such as SDXL) is one module defining a `METHOD` entry
(`compinv.methods.registry.Method`) and one line here; the CLI, `compinv.train`,
`load_concepts`, the toy ablation and the tests pick it up from `METHODS`.
"""

from __future__ import annotations

from compinv.errors import CompinvError
from compinv.methods import custom_diffusion, dreambooth, textual_inversion
from compinv.methods.registry import ArtifactReader, Method

METHODS: dict[str, Method] = {m.name: m for m in (
    textual_inversion.METHOD,
    custom_diffusion.METHOD,
    dreambooth.METHOD,
)}


def method_of(config: object) -> Method:
    """The method whose config class `config` is an instance of."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    names = ", ".join(m.config_class.__name__ for m in METHODS.values())
    raise CompinvError(f"`config` is a {type(config).__name__}; pass one of {names}")


def readers() -> list[ArtifactReader]:
    """Every artifact kind, those that must be loaded first (whole models) first."""
    found = [r for m in METHODS.values() for r in m.readers]
    return sorted(found, key=lambda r: not r.first)
