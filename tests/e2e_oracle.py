"""The end-to-end oracle: a run of the official inference path, image in and image out, with every random draw.

The fixture directory is ``$XPSR_E2E_FIXTURE`` when set (any fixture of the same format,
its checkpoint where its e2e.json says), else the copy in tests/fixtures/. Its README
states the comparisons; the bounds below are those.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

DEFAULT_FIXTURE = Path(__file__).parent / "fixtures" / "xpsr_e2e_official"

RELATIVE_L2 = 1e-4
"""Every step's latent and the decoded image, fp32 against fp32."""
FINAL_MAX = 4 / 255
FINAL_MEAN = 1 / 255
"""The final image: the official path rounds to 8 bits three times, a float pipeline never."""


@dataclass
class E2EFixture:
    root: Path

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.root / "e2e.json").read_text())

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / "e2e.safetensors")

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def checkpoint(self) -> Path:
        return (self.root / self.meta["checkpoint"]).resolve()

    def checkpoint_mismatches(self) -> list[str]:
        """Checkpoint files whose sha256 is not the one the fixture was computed with."""
        return [name for name, digest in self.meta["checkpoint_sha256"].items()
                if hashlib.sha256((self.checkpoint / name).read_bytes()).hexdigest() != digest]

    @property
    def case_names(self) -> list[str]:
        return [c["name"] for c in self.meta["cases"]]

    def case(self, name: str) -> E2ECase:
        return E2ECase(self, next(c for c in self.meta["cases"] if c["name"] == name))


@dataclass
class E2ECase:
    fixture: E2EFixture
    settings: dict

    @property
    def name(self) -> str:
        return self.settings["name"]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fixture.tensors[f"{self.name}.{name}"]

    def draws(self) -> list[torch.Tensor]:
        """The recorded random draws, in the order the official run drew them."""
        return [self[f"noise.{i}"] for i in range(len(self.settings["noise_tags"]))]

    def latents(self) -> list[torch.Tensor]:
        """The latent after each step (diffusers' scaled latent space)."""
        return [self[f"latents.{k}"] for k in range(self.settings["steps_recorded"])]

    def image_path(self, stage: str) -> Path:
        return self.fixture.root / f"{self.name}_{stage}.png"

    def image(self, stage: str) -> torch.Tensor:
        """One of the case's PNGs as (1, 3, H, W) in [0, 1]."""
        array = np.asarray(Image.open(self.image_path(stage)).convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(array).permute(2, 0, 1)[None]


def e2e_fixture() -> E2EFixture:
    return E2EFixture(Path(os.environ.get("XPSR_E2E_FIXTURE", DEFAULT_FIXTURE)))


def relative_l2(actual: torch.Tensor, reference: torch.Tensor) -> float:
    assert actual.shape == reference.shape, f"shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    return float((actual.double() - reference.double()).norm() / reference.double().norm())


def assert_close_l2(actual: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    err = relative_l2(actual, reference)
    assert err <= RELATIVE_L2, f"{what}: relative L2 error {err:.3g} > {RELATIVE_L2:g}"


def assert_image_close(actual: torch.Tensor, reference: torch.Tensor, what: str, max_diff: float = FINAL_MAX,
                       mean_diff: float = FINAL_MEAN) -> None:
    """Images (1, 3, H, W) in [0, 1], within the final image's bounds (max and mean absolute difference)."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    diff = (actual.float() - reference.float()).abs()
    assert diff.max() <= max_diff + 1e-6 and diff.mean() <= mean_diff, (
        f"{what}: max |diff| {diff.max() * 255:.2f}/255 (bound {max_diff * 255:.0f}/255), "
        f"mean {diff.mean() * 255:.3f}/255 (bound {mean_diff * 255:.0f}/255)")
