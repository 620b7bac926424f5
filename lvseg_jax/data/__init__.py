"""Sunnybrook Cardiac Data (SCD) and other 2D cine frames: loading, splits, preprocessing,
datasets.

Two layouts load into the same `Frame` records (README "Data"): `dicom`, the Cardiac Atlas
Project release (`scd_dicom`), and `png`, folders of images with label masks (`png`). Cases are
named by their zero-padded contour-folder name (`SC-HF-I-01`); the challenge's `OriginalID`
form (`SC-HF-I-1`) is accepted everywhere and normalized.

Bad input raises `DataError` naming the file and the problem, or with `on_error='skip'` is
logged, left out, and counted in the `LoadReport` summary. Nothing is dropped silently.

Modules: `records` (Frame, errors), `scd_dicom`, `png`, `nifti` (3D / 4D volumes, predict
input), `acdc` and `nifti_folders` (NIfTI training layouts), `sources` (`load_frames`),
`splits`, `preprocess` (`Geometry`), `dataset` (`Dataset`, cache, `load_datasets`).
"""

from lvseg_jax.data.dataset import (CACHE_VERSION, Dataset, build_dataset, cache_key,
                                    expert_centre, load_cache, load_dataset, load_datasets,
                                    save_cache, write_split)
from lvseg_jax.data.nifti import is_nifti, load_labelled_volume, load_nifti_series
from lvseg_jax.data.png import (load_png_folder, parse_png_name, read_png, read_spacing_table,
                                spacing_table_path, write_spacing_table)
from lvseg_jax.data.preprocess import (BACKGROUND, BACKGROUND_OR_MYOCARDIUM, CAVITY, MYOCARDIUM,
                                       RESIZE_MODES, ROI_MODE, Geometry, class_map,
                                       frame_centre, get_resize_mode, mask_centre,
                                       normalize_intensity, preprocess_image, preprocess_mask,
                                       roi_geometry)
from lvseg_jax.data.records import (ON_ERROR, DataError, Frame, LoadReport, case_group,
                                    normalize_case_id)
from lvseg_jax.data.scd_dicom import (attach_contours, expert_contour_dir, list_dicom_files,
                                      load_dicom_series, read_dicom_frame, read_patient_sheet)
from lvseg_jax.data.sources import SOURCES, available_cases, get_source, load_frames
from lvseg_jax.data.splits import (ALL_CASES, OFFICIAL_SETS, SPLITS, case_splits,
                                   get_official_set, kfold_assignments)
