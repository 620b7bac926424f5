"""Writers for prediction outputs: mask / uncertainty PNGs, overlays, contour files, NIfTI.

Conventions (docs/ARCHITECTURE.md): masks are (H, W) arrays, nonzero = LV cavity; contours are
(P, 2) (x, y) pixel coordinates (x = column, y = row); pixel spacing is (row, col) mm.

NIfTI geometry. DICOM places pixel (row r, column c) of a frame at
`ImagePositionPatient + c * PixelSpacing[1] * X + r * PixelSpacing[0] * Y`, with X, Y the two
direction cosines of ImageOrientationPatient, in LPS patient coordinates. The NIfTI arrays written
here are indexed `[c, r, k(, t)]` (column, row, slice, phase), and the affine is that mapping
converted to RAS (x and y negated), with the third column the step between consecutive slices'
ImagePositionPatient. `nibabel.load(path).affine @ [c, r, k, 1]` therefore gives the RAS position
of the centre of pixel (r, c) of slice k.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from lvseg_jax import contours as contours_lib
from lvseg_jax import metrics

# LPS (DICOM) -> RAS (NIfTI): flip the first two patient axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Largest variance a probability in [0, 1] can have across TTA predictions (half 0, half 1).
MAX_PROBABILITY_VARIANCE = 0.25


def auto_contour_filename(instance: int, kind: str = 'i') -> str:
  """`IM-0001-NNNN-icontour-auto.txt`, the name the 2009 challenge evaluator reads.

  The `IM-0001` prefix is constant, like the expert files' (the DICOM prefix varies per case);
  NNNN is the DICOM InstanceNumber.
  """
  if not 0 <= int(instance) <= 9999:
    raise ValueError(f'instance number must be in [0, 9999], got {instance}')
  return f'IM-0001-{int(instance):04d}-{contours_lib.get_contour_kind(kind)}-auto.txt'


def write_auto_contour(folder: str, instance: int, contour: np.ndarray, kind: str = 'i'
                       ) -> str | None:
  """Writes an automatic contour in the SCD format; returns its path, None if `contour` is empty.

  An empty prediction gets no file: the evaluator then counts the frame as not detected.
  """
  contour = np.asarray(contour, dtype=np.float64)
  if len(contour) < 3:
    return None
  path = os.path.join(folder, auto_contour_filename(instance, kind))
  contours_lib.write_contour_file(path, contour)
  return path


def _makedirs_for(path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


# Label values of the mask PNGs (the SCD label PNGs use 255 for the region).
PNG_CAVITY, PNG_MYOCARDIUM = 255, 128


def write_mask_png(path: str, mask: np.ndarray, myocardium: np.ndarray | None = None) -> None:
  """Saves an (H, W) LV cavity mask as an 8-bit PNG: 0 background, 255 cavity (like the SCD
  label PNGs) and, given the myocardium mask, 128 myocardium."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f'mask must be (H, W), got shape {mask.shape}')
  values = np.where(mask != 0, PNG_CAVITY, 0)
  if myocardium is not None:
    values = np.where((np.asarray(myocardium) != 0) & (mask == 0), PNG_MYOCARDIUM, values)
  _makedirs_for(path)
  Image.fromarray(values.astype(np.uint8), mode='L').save(path)


def uncertainty_to_uint8(variance: np.ndarray, vmax: float = MAX_PROBABILITY_VARIANCE
                         ) -> np.ndarray:
  """Maps a variance map linearly from [0, vmax] to [0, 255] (clipped), for PNG output."""
  variance = np.asarray(variance, dtype=np.float64)
  return np.round(np.clip(variance / vmax, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_uncertainty_png(path: str, variance: np.ndarray,
                          vmax: float = MAX_PROBABILITY_VARIANCE) -> None:
  """Saves a per-pixel variance map as 8-bit grey: 0 = all TTA predictions agree, 255 = vmax.

  The default `vmax` is 0.25, the largest possible variance of a probability, so grey levels are
  comparable across frames and series: value / 255 * 0.25 is the variance.
  """
  variance = np.asarray(variance)
  if variance.ndim != 2:
    raise ValueError(f'uncertainty map must be (H, W), got shape {variance.shape}')
  _makedirs_for(path)
  Image.fromarray(uncertainty_to_uint8(variance, vmax), mode='L').save(path)


def _display_range(image: np.ndarray) -> tuple[float, float]:
  # Percentile window: raw MR intensities have a few very bright pixels (fat, flow).
  lo, hi = np.percentile(image, [1.0, 99.0])
  if hi <= lo:
    lo, hi = float(image.min()), float(image.max()) + 1e-6
  return float(lo), float(hi)


# Overlay colours (RGB): predicted solid, expert dashed; endocardium red / green, epicardium
# orange / cyan. Order = drawing order (the prediction is drawn over the expert).
OVERLAY_STYLES = (('expert', (0, 255, 0), True), ('predicted', (255, 0, 0), False),
                  ('expert epi', (0, 255, 255), True), ('predicted epi', (255, 165, 0), False))


def _dashes(points: np.ndarray, on: float, off: float) -> list[np.ndarray]:
  """Splits a polyline into dashes of arc length `on` separated by gaps of `off`."""
  steps = np.hypot(*np.diff(points, axis=0).T)
  length = np.concatenate([[0.0], np.cumsum(steps)])
  dashes = []
  for start in np.arange(0.0, length[-1], on + off):
    stop = min(start + on, length[-1])
    inner = points[(length > start) & (length < stop)]
    ends = [np.array([np.interp(t, length, points[:, i]) for i in (0, 1)]) for t in (start, stop)]
    dashes.append(np.vstack([ends[0], inner, ends[1]]))
  return dashes


class OverlayWriter:
  """Saves images with the predicted contours (endocardium red, epicardium orange) and the
  expert's (green and cyan, dashed), a title at the top left and a key at the bottom right.

  Drawn with Pillow at `supersample` x the image size on a nearest-neighbour enlargement and
  reduced by box averaging: the image pixels come back unchanged and lines and text are
  anti-aliased. About 2 ms per 256 x 256 frame (a matplotlib figure took 20 ms, most of a
  240-frame prediction's writing time). Contour (x, y) coordinates are pixel centres.
  """

  def __init__(self, supersample: int = 4, font_px: int = 7):
    self.supersample = supersample
    self._font = ImageFont.load_default(size=font_px * supersample)

  def write(self, path: str, image: np.ndarray, pred_contour: np.ndarray | None,
            expert_contour: np.ndarray | None = None, title: str = '', *,
            pred_epi: np.ndarray | None = None, expert_epi: np.ndarray | None = None) -> None:
    """Renders one overlay PNG (see `render`)."""
    rgb = self.render(image, pred_contour, expert_contour, title, pred_epi=pred_epi,
                      expert_epi=expert_epi)
    _makedirs_for(path)
    Image.fromarray(rgb).save(path, compress_level=1)

  def render(self, image: np.ndarray, pred_contour: np.ndarray | None,
             expert_contour: np.ndarray | None = None, title: str = '', *,
             pred_epi: np.ndarray | None = None, expert_epi: np.ndarray | None = None
             ) -> np.ndarray:
    """The overlay as an (H, W, 3) uint8 array; contours of fewer than 3 points are not drawn."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
      raise ValueError(f'image must be (H, W), got shape {image.shape}')
    lo, hi = _display_range(image)
    grey = np.round(np.clip((image - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    s = self.supersample
    canvas = Image.fromarray(grey, mode='L').convert('RGB')
    canvas = canvas.resize((canvas.width * s, canvas.height * s), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    shown = []
    for (name, colour, dashed), contour in zip(
        OVERLAY_STYLES, (expert_contour, pred_contour, expert_epi, pred_epi)):
      if contour is None or len(contour) < 3:
        continue
      # Pixel centre (x, y) -> supersampled canvas coordinates.
      points = (_closed(np.asarray(contour, np.float64)) + 0.5) * s - 0.5
      for piece in _dashes(points, 4.0 * s, 3.0 * s) if dashed else [points]:
        draw.line([tuple(p) for p in piece], fill=colour, width=s, joint='curve')
      shown.append((name, colour))
    if title:
      draw.text((2 * s, 2 * s), title, fill=(255, 255, 0), font=self._font)
    y = canvas.height - 2 * s
    for name, colour in reversed(shown):
      draw.text((canvas.width - 2 * s, y), name, fill=colour, font=self._font, anchor='rd')
      y -= self._font.size + s
    return np.asarray(canvas.reduce(s))


def _closed(contour: np.ndarray) -> np.ndarray:
  return np.concatenate([contour, contour[:1]], axis=0)


def expert_outline(frame, epicardium: bool = False) -> np.ndarray | None:
  """The expert contour of a frame (endocardium, or the epicardium): its polygon, else the
  outline of its mask (PNG data)."""
  contour, mask = ((frame.epi_contour, frame.epi_mask) if epicardium
                   else (frame.contour, frame.mask))
  if contour is not None:
    return contour
  if mask is not None and mask.any():
    return metrics.mask_to_contour(mask)
  return None


def write_volume_curve_png(path: str, volumes_ml: Sequence[float | None],
                           expert_volumes_ml: Sequence[float | None] | None = None,
                           ed_phase: int | None = None, es_phase: int | None = None,
                           title: str = '') -> None:
  """Plots the LV volume of each phase (predicted, and expert where known), ED / ES marked."""
  # Imported here, as nibabel below: a caller that writes no such file does not load them.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  phases = np.arange(len(volumes_ml))
  pred = np.array([np.nan if v is None else v for v in volumes_ml], dtype=np.float64)
  fig = Figure(figsize=(5.0, 2.8), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(phases, pred, 'o-', color='red', markersize=3, label='predicted')
  if expert_volumes_ml is not None:
    expert = np.array([np.nan if v is None else v for v in expert_volumes_ml], np.float64)
    if np.isfinite(expert).any():
      ax.plot(phases, expert, 's', color='green', markersize=5, label='expert')
  for phase, name in ((ed_phase, 'ED'), (es_phase, 'ES')):
    if phase is not None and np.isfinite(pred[phase]):
      ax.annotate(name, (phase, pred[phase]), textcoords='offset points', xytext=(0, 6),
                  ha='center', fontsize=7)
  ax.set_xlabel('phase')
  ax.set_ylabel('LV volume (mL)')
  ax.set_title(title, fontsize=7)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _makedirs_for(path)
  fig.savefig(path)


def dicom_affine(image_position: Sequence[float], image_orientation: Sequence[float],
                 pixel_spacing: Sequence[float], slice_step: Sequence[float]) -> np.ndarray:
  """4x4 RAS affine of a `[column, row, slice]` array from DICOM geometry.

  Args:
    image_position: ImagePositionPatient of slice 0 (LPS mm, centre of its first pixel).
    image_orientation: ImageOrientationPatient, 6 direction cosines (row dir X, column dir Y).
    pixel_spacing: (row, col) mm.
    slice_step: LPS vector from slice k to slice k + 1 (mm).
  """
  orientation = np.asarray(image_orientation, dtype=np.float64).reshape(2, 3)
  row_spacing, col_spacing = (float(v) for v in pixel_spacing)
  lps = np.eye(4)
  lps[:3, 0] = orientation[0] * col_spacing  # along a row: the column index grows
  lps[:3, 1] = orientation[1] * row_spacing  # down a column: the row index grows
  lps[:3, 2] = np.asarray(slice_step, dtype=np.float64)
  lps[:3, 3] = np.asarray(image_position, dtype=np.float64)
  return LPS_TO_RAS @ lps


def nominal_affine(pixel_spacing: Sequence[float], slice_spacing: float) -> np.ndarray:
  """Axis-aligned affine for images without DICOM geometry (PNG input): spacing only."""
  row_spacing, col_spacing = (float(v) for v in pixel_spacing)
  return np.diag([col_spacing, row_spacing, float(slice_spacing), 1.0])


def write_nifti(path: str, volume: np.ndarray, affine: np.ndarray,
                time_step_ms: float | None = None) -> None:
  """Saves a `[column, row, slice(, phase)]` volume; qform and sform both hold `affine`.

  Args:
    path: `.nii` or `.nii.gz`.
    volume: 3D or 4D array, already in `[c, r, k(, t)]` order (see `to_nifti_order`).
    affine: 4x4 RAS affine (`dicom_affine` or `nominal_affine`).
    time_step_ms: for 4D volumes, the time between phases, stored as the 4th zoom.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  volume = np.asarray(volume)
  if volume.ndim not in (3, 4):
    raise ValueError(f'volume must be 3D or 4D, got shape {volume.shape}')
  image = nib.Nifti1Image(volume, np.asarray(affine, dtype=np.float64))
  image.header.set_xyzt_units(xyz='mm', t='msec')
  if volume.ndim == 4:
    zooms = list(image.header.get_zooms()[:3]) + [float(time_step_ms or 1.0)]
    image.header.set_zooms(zooms)
  # qform code 1 (scanner anatomical) so viewers place the volume in patient space.
  image.set_qform(image.affine, code=1)
  image.set_sform(image.affine, code=1)
  _makedirs_for(path)
  nib.save(image, path)


def to_nifti_order(stack: np.ndarray) -> np.ndarray:
  """(S, T, H, W) or (S, H, W) frames -> `[c, r, k(, t)]` = (W, H, S(, T)) NIfTI order."""
  stack = np.asarray(stack)
  if stack.ndim == 4:
    return np.transpose(stack, (3, 2, 0, 1))
  if stack.ndim == 3:
    return np.transpose(stack, (2, 1, 0))
  raise ValueError(f'expected (S, T, H, W) or (S, H, W), got shape {stack.shape}')
