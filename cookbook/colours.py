"""The colour-naming task both multi_modal recipes share: images they draw themselves and the answers.

Squares of red, green or blue: the training set at full brightness, the test set in shades never
trained on. Recipes import this file by path (it sits next to them), like common.py.
"""

from __future__ import annotations

import io

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
QUESTION = "What colour is this?"
IMAGE_SIZE = 128  # pixels a side: 16 image tokens on twinkle-tiny-vl
TEST_SHADES = (0.9, 0.75)


def draw(rgb: tuple[int, int, int], size: int = IMAGE_SIZE, shade: float = 1.0) -> bytes:
    """A PNG of one flat colour, darkened by `shade`."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), tuple(int(c * shade) for c in rgb)).save(buf, "PNG")
    return buf.getvalue()


def train_set() -> list[tuple[bytes, str]]:
    """(PNG, colour name) for each colour at full brightness."""
    return [(draw(rgb), name) for name, rgb in COLOURS.items()]


def test_set() -> list[tuple[bytes, str]]:
    """(PNG, colour name) in shades the model never trained on."""
    return [(draw(rgb, shade=shade), name) for name, rgb in COLOURS.items() for shade in TEST_SHADES]


def answer_of(text: str, end_of_turn: str = "<|im_end|>") -> str:
    """The reply a model gave, up to the end of its turn, trimmed."""
    return text.split(end_of_turn)[0].strip()
