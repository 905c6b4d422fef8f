"""The parity oracle: fixtures written by the official XPSR code, and the tolerance they are held to.

The fixture directory is ``$XPSR_PARITY_FIXTURE`` when set (any fixture of the same
format), else the copy in tests/fixtures/.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

DEFAULT_FIXTURE = Path(__file__).parent / "fixtures" / "xpsr_tiny_official"


@dataclass
class ParityFixture:
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.root / "cases.json").read_text())

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / "cases.safetensors")

    @property
    def case_ids(self) -> list[int]:
        return [c["index"] for c in self.meta["cases"]]

    def case(self, k: int) -> Case:
        return Case(self, k)


@dataclass
class Case:
    fixture: ParityFixture
    index: int

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fixture.tensors[f"case{self.index}.{name}"]

    def get(self, name: str) -> torch.Tensor | None:
        return self.fixture.tensors.get(f"case{self.index}.{name}")

    @property
    def scale(self) -> float:
        return self.fixture.meta["cases"][self.index]["conditioning_scale"]

    def names(self, prefix: str) -> list[str]:
        """Output names with a prefix, in index order (cn_down.0, cn_down.1, ...)."""
        found = [n.split(".", 1)[1] for n in self.fixture.tensors if n.startswith(f"case{self.index}.{prefix}.")]
        return sorted(found, key=lambda n: int(n.rsplit(".", 1)[1]))


def parity_fixture() -> ParityFixture:
    return ParityFixture(Path(os.environ.get("XPSR_PARITY_FIXTURE", DEFAULT_FIXTURE)))


def assert_parity(actual: torch.Tensor, reference: torch.Tensor, what: str, tolerance: float = 1e-4) -> None:
    """max |actual - reference| <= tolerance * max(1, max |reference|); 1e-4 is the acceptance tolerance.

    The bound scales with the reference's magnitude, so that a fixture with large values is held
    to the same relative precision, and never drops below ``tolerance`` for small ones.
    """
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    bound = tolerance * max(1.0, reference.abs().max().item())
    err = (actual.float() - reference.float()).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"
