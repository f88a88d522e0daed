"""An independent judge of digit images: which digit and which ink colour an image shows, with no neural network."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .digits import BACKGROUNDS, DIGIT_WORDS, INK_COLORS, load_digit_scans, split_scan_indices


class DigitJudge:
    r"""
    Judges images of coloured digits: an SVM on the 8x8 scans of the `train` split for the digit, the nearest ink
    colour for the colour.

    An image is read as ink relative to the background: the colour is the ink colour nearest to the mean of its
    most inked pixels, the ink of each pixel is its projection on the line from the background to that colour, and
    the ink map averaged down to 8x8 (scaled to 0-16) goes to the SVM. A render of a scan gives back that scan.

    Called as `judge(images, texts)` it is a consistency scorer for [`UniGameTrainer`] (`consistency_scorer=`): the
    score of an image is the probability that it shows the digit named in its text, times 1 when its colour is the
    one named (0 otherwise). A text that names no digit (or no colour) is not judged on it.

    Args:
        background (`str` or `tuple`, *optional*, defaults to `"white"`):
            Background of the images judged (a name of `BACKGROUNDS` or an RGB tuple).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the SVM.
        size_invariant (`bool`, *optional*, defaults to `False`):
            For the canvas world, where a digit can be drawn at any size and place: the ink is cropped to its bounding
            box, padded to a square and resized to the frame before it is averaged down to 8x8, and the SVM learns
            from the train scans normalised the same way. `False` reads the frame as it is (a digit fills it).
    """

    def __init__(self, background: str | tuple = "white", seed: int = 0, size_invariant: bool = False):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        scans, digits = load_digit_scans()
        train = split_scan_indices("train")
        self.size_invariant = size_invariant
        if size_invariant:
            scans = (normalise_ink(torch.from_numpy(scans).float() / 16) * 16).numpy()
        self.classifier = CalibratedClassifierCV(SVC(gamma=0.001, random_state=seed), ensemble=False)
        self.classifier.fit(scans[train].reshape(len(train), -1).astype(np.float64), digits[train])
        background = BACKGROUNDS[background] if isinstance(background, str) else background
        self.background = torch.tensor(background, dtype=torch.float32) / 255
        self.color_names = list(INK_COLORS)
        self.colors = torch.tensor([INK_COLORS[c] for c in self.color_names], dtype=torch.float32) / 255

    @staticmethod
    def _as_tensor(images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu()
            return images.float() / 255 if images.dtype == torch.uint8 else images.float()
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def ink(self, images) -> tuple[torch.Tensor, list[str]]:
        """Returns `(ink, colors)`: each image's ink map `(B, H, W)` in `[0, 1]` at full resolution, and its ink colour
        name (see [`~DigitJudge.read`])."""
        pixels = self._as_tensor(images)
        away = self.background.view(1, 3, 1, 1) - pixels  # (B, 3, H, W), how far each pixel is from the background
        strength = away.norm(dim=1).flatten(1)  # (B, H*W)
        weights = (strength >= 0.5 * strength.max(dim=1, keepdim=True).values.clamp(min=1e-6)).float()
        mean_ink = (pixels.flatten(2) * weights[:, None]).sum(-1) / weights.sum(-1, keepdim=True).clamp(min=1)
        color_ids = torch.cdist(mean_ink, self.colors).argmin(-1)
        direction = self.background[None] - self.colors[color_ids]  # (B, 3)
        ink = (away * direction[:, :, None, None]).sum(1) / direction.pow(2).sum(-1).clamp(min=1e-6)[:, None, None]
        return ink.clamp(0, 1), [self.color_names[i] for i in color_ids.tolist()]

    def digit_sizes(self, images, threshold: float = 0.2) -> torch.Tensor:
        """The side in pixels of each image's digit: the longer side of the box of its pixels with ink above
        `threshold` times its largest ink (0 for an image without ink)."""
        ink, _ = self.ink(images)
        boxes = [ink_box(image, threshold) for image in ink]
        return torch.tensor([0 if box is None else max(box[1] - box[0], box[3] - box[2]) for box in boxes])

    def read(self, images) -> tuple[torch.Tensor, list[str]]:
        """Returns `(scans, colors)`: each image's ink as an 8x8 scan (0-16, float) and its ink colour name.

        Args:
            images: a float tensor `(B, 3, H, W)` in `[0, 1]`, a uint8 tensor, or PIL images.
        """
        ink, colors = self.ink(images)
        scans = (normalise_ink(ink) if self.size_invariant else F.adaptive_avg_pool2d(ink[:, None], 8)[:, 0]) * 16
        return scans, colors

    def digit_probabilities(self, images) -> np.ndarray:
        """Probability of each digit 0-9 for each image, shape `(B, 10)`."""
        scans, _ = self.read(images)
        return self.classifier.predict_proba(scans.reshape(len(scans), -1).double().numpy())

    def predict(self, images) -> tuple[list[int], list[str]]:
        """Returns `(digits, colors)`: the digit and the ink colour name judged for each image."""
        scans, colors = self.read(images)
        digits = self.classifier.predict(scans.reshape(len(scans), -1).double().numpy())
        return [int(d) for d in digits], colors

    def __call__(self, images, texts: list[str]) -> torch.Tensor:
        scans, colors = self.read(images)
        if len(scans) != len(texts):
            raise ValueError(f"Got {len(scans)} images and {len(texts)} texts; they must match.")
        probabilities = self.classifier.predict_proba(scans.reshape(len(scans), -1).double().numpy())
        scores = []
        for probs, color, text in zip(probabilities, colors, texts):
            words = text.lower().replace("?", " ").replace(".", " ").split()
            named_digits = [d for d, w in enumerate(DIGIT_WORDS) if w in words]
            named_colors = [c for c in self.color_names if c in words]
            score = float(probs[named_digits[0]]) if named_digits else 1.0
            if named_colors and named_colors[0] != color:
                score = 0.0
            scores.append(score)
        return torch.tensor(scores, dtype=torch.float32)


def ink_box(image: torch.Tensor, threshold: float = 0.2) -> tuple[int, int, int, int] | None:
    """`(top, bottom, left, right)` (bottom and right exclusive) of the pixels of an ink map `(H, W)` with ink at
    least `threshold` times its largest; `None` for a map without ink."""
    peak = image.max()
    if peak <= 0:
        return None
    rows, cols = torch.nonzero(image >= threshold * peak, as_tuple=True)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def normalise_ink(ink: torch.Tensor, size: int = 8, threshold: float = 0.2) -> torch.Tensor:
    """Each ink map `(B, H, W)` in `[0, 1]` cropped to the box of its pixels above `threshold` times its largest ink,
    padded to a square around that box, and resized to `(size, size)` (area average): the same digit at any size and
    place gives about the same map. A map without ink stays blank."""
    out = torch.zeros(len(ink), size, size, dtype=torch.float32)
    for i, image in enumerate(ink.float()):
        box = ink_box(image, threshold)
        if box is None:
            continue
        top, bottom, left, right = box
        crop = image[top:bottom, left:right]
        side = max(crop.shape)
        pad_h, pad_w = side - crop.shape[0], side - crop.shape[1]
        crop = F.pad(crop, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        big = F.interpolate(crop[None, None], size=(4 * size, 4 * size), mode="bilinear", align_corners=False)
        out[i] = F.adaptive_avg_pool2d(big, size)[0, 0]
    return out
