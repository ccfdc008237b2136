"""Test-only user tools, loaded by dotted path exactly as a user's own (`tools: "Crop|tests.my_tools:Count|..."`)."""

import time

from PIL import ImageOps

import tools


class Count(tools.Tool):
    """A text tool: how many distinct colours a region holds."""
    name = "Count"
    description = ("Count [x1, y1, x2, y2]: how many distinct colours a region holds; the number comes back as "
                   "<tool_response>n</tool_response>.")

    def __init__(self, bbox_format: str = "pixel"):
        self.bbox_format = bbox_format

    def run(self, args, images, keys):
        box = tools.crop_box(args, images[0].size, self.bbox_format)
        return tools.ToolResult(name=self.name, text=str(len(images[0].convert("RGB").crop(box).getcolors(1 << 24))))


class Flip(tools.Tool):
    """An image tool that knows its result's size from the box (the length pass never decodes for it)."""
    name, returns = "Flip", "image"
    description = "Flip [x1, y1, x2, y2]: the region mirrored left to right, shown right after the call."

    def __init__(self, bbox_format: str = "pixel", min_side: int = 32):
        self.bbox_format, self.min_side = bbox_format, min_side

    def output_size(self, args, size):
        x1, y1, x2, y2 = tools.crop_box(args, size, self.bbox_format, self.min_side)
        return x2 - x1, y2 - y1

    def run(self, args, images, keys):
        box = tools.crop_box(args, images[0].size, self.bbox_format, self.min_side)
        return tools.ToolResult(name=self.name, image=ImageOps.mirror(images[0].crop(box)))


class Turn(tools.Tool):
    """An image tool that does not tell its result's size (output_size None): the length pass runs it on pixels."""
    name, returns = "Turn", "image"
    description = "Turn: the whole image turned a quarter to the left."

    def run(self, args, images, keys):
        return tools.ToolResult(name=self.name, image=images[0].transpose(2))  # PIL ROTATE_90


class SlowCrop(tools.Crop):
    """Crop, taking `seconds` on the image named `slow_key` (a slow tool of yours: OCR, a remote model); every run's
    (key, start, end) times are kept in `runs`, so a test sees what ran while it waited."""
    runs: list = []

    def __init__(self, slow_key: str = "", seconds: float = 1.0, bbox_format: str = "pixel"):
        super().__init__(bbox_format=bbox_format)
        self.slow_key, self.seconds = slow_key, seconds

    def run(self, args, images, keys):
        start = time.monotonic()
        if keys and keys[0] == self.slow_key:
            time.sleep(self.seconds)
        result = super().run(args, images, keys)
        SlowCrop.runs.append((keys[0] if keys else "", start, time.monotonic()))
        return result
