"""Inference on new scans: masks, contours, overlays, NIfTI volumes, LV volumes and EF.

  python main.py --mode=predict [--workdir=<trained run>] \
      --input=<DICOM series | tree of series | NIfTI file or folder | PNG folder> --output=<dir>

Modules, in the order a prediction flows through them:
  * `inputs.find_series(input, config)`: the input -> `Series` (DICOM series via
    `data.load_dicom_series`, NIfTI volumes via `data.load_nifti_series`, PNG folders via
    `data.load_png_folder` or plain PNG files).
  * `roi.Localizer.centres(frames)`: only for a `data.resize_mode='roi'` model, the first of
    two stages: another model (`data.roi_localizer`) finds each frame's LV, the window's centre.
  * `inference.predict_frames(model, variables, frames, config)`: the core, independent of
    checkpoints and files. Preprocesses with `data.preprocess_image` (the training path),
    runs a jitted forward pass in fixed-size batches (optionally test-time augmented: flips
    and 90-degree rotations, softmax averaged, per-pixel variance as the uncertainty; only for
    models trained with flip augmentation, see docs/RESULTS.md), maps probabilities back to
    each frame's original grid, post-processes (largest connected component, hole filling)
    and extracts the automatic contour.
  * `measure.summarize_series`: areas per slice and phase, ED/ES, EDV/ESV/SV/EF (`clinical`).
  * `outputs.write_series_outputs`: every file (`export`).
  * `pipeline.predict(config, workdir, input, output)`: loads the checkpoint and runs the above.

Output folder (one subfolder per series, named `<case>_<series folder>`):
  masks/IM-0001-NNNN.png               predicted mask, 0/255
  overlays/IM-0001-NNNN.png            image + predicted contour (+ expert contour if known)
  uncertainty/IM-0001-NNNN.png         TTA variance, 0..255 = 0..0.25 (only with predict.tta)
  contours/IM-0001-NNNN-icontour-auto.txt   the challenge evaluator's format, one `x y` per line
  <series>_mask.nii.gz, <series>_image.nii.gz   [column, row, slice, phase] volumes (DICOM only
                                       geometry; see export.py for the affine)
  frames.csv                           one row per frame: slice, phase, area, expert area, Dice
  volumes.csv, volume_curve.png        total LV volume per phase (predicted, expert), ED / ES
  summary.json                         everything above plus EDV/ESV/SV/EF, ED/ES, warnings
and at the top level `summary.csv` / `summary.json` with one entry per series.

Volumes: area of a predicted mask = pixel count x row spacing x col spacing; volume = sum over
slices of area x spacing between slices; ED / ES = phases with the largest / smallest total
volume (`clinical.lv_volumes`). With expert contours the summary also holds the expert volumes
by the data README's per-slice definition (shoelace areas, per-slice max / min), by the phase
definition on the same polygons, and by the phase definition on the rasterized expert masks (the
same area definition as the predictions; 5-7% larger than shoelace areas on the SCD because
the rasterized masks include the boundary pixels).

Bad input and fallbacks (all logged, and listed under `warnings` in summary.json):
  * no DICOM or PNG files under the input, a missing input, a single file: `inputs.PredictError`.
  * a folder whose DICOMs belong to several SeriesInstanceUIDs: `inputs.PredictError` naming
    them (put each series in its own folder; a tree of folders is fine).
  * unreadable files, frames of another size within a series: `data.DataError`, or skipped and
    counted with `--config.predict.on_error=skip`.
  * missing PixelSpacing: the nominal `config.data.nominal_spacing_mm` (spacing_source
    'nominal'); PNG input has no spacing unless `config.data.spacing_table` names it.
  * spacing between slices: DICOM SpacingBetweenSlices, else the distance between slice
    positions, else SliceThickness, else `config.predict.slice_spacing_mm`; without any, volumes
    are not computed (areas still are).
  * any image size: frames are resized to the network size (`config.data.resize_mode`) and the
    prediction is mapped back to the original grid; a series whose frames have different sizes
    gets no NIfTI (warned).
  * frames without slice / phase information (plain PNG folders): masks, contours and areas per
    frame only; no volumes and a NIfTI that is a plain frame stack.
"""

from lvseg_jax.predict.inference import (LV_CLASS, TTA_TRANSFORMS, Prediction, make_forward_fn,
                                         postprocess_mask, predict_frames, tta_mode,
                                         unseen_tta)
from lvseg_jax.predict.inputs import PredictError, Series, check_single_series, find_series
from lvseg_jax.predict.measure import (area_grid_from, expert_areas, expert_volumes, grid_shape,
                                       has_grid, series_affine, slice_spacing, summarize_series)
from lvseg_jax.predict.outputs import (FRAME_COLUMNS, SERIES_COLUMNS, series_row,
                                       write_nifti_volumes, write_series_outputs)
from lvseg_jax.predict.pipeline import inference_config, predict, run_series
from lvseg_jax.predict.roi import Localizer
