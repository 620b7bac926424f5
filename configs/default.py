"""Default configuration for lvseg-jax.

Every size is a config value. The defaults follow the paper's setting (full 256x256 images,
U-Net base width 64, four poolings); `configs/smoke.py` shrinks everything for tests and CPU runs.
Model variant configs (`unet.py`, `lnu.py`, `ibu.py`) import this file and change only the model.
"""

import os

import ml_collections

# Where the Sunnybrook data lives. Overridden by `--config.data.root=...` or $LVSEG_DATA_DIR.
DEFAULT_DATA_ROOT = os.environ.get('LVSEG_DATA_DIR', '../shared/data/scd')


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (paper-scale) configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # JAX's persistent compilation cache for evaluate and predict: a second run skips compiling
  # the forward pass ('' = off).
  config.compilation_cache_dir = os.path.join(os.path.expanduser('~'), '.cache', 'lvseg_jax',
                                              'xla')

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'          # unet | lnu | ibu (see lvseg_jax.models.MODELS)
  model.base_width = 64        # channels of the first block, doubled at each pooling
  model.depth = 4              # number of 2x2 max-poolings
  model.num_classes = 2        # 2: background, LV cavity; 3: + LV myocardium (data.myocardium)
  model.norm = 'none'          # unet only: none | batch
  model.ibn_mode = 'split'     # ibu only: split (IBN-Net "a") | sequential | blend
  model.ibn_ratio = 0.5        # ibu split: fraction of channels that get instance norm
  model.bn_momentum = 0.9      # Flax convention: running = m * running + (1 - m) * batch
  model.norm_epsilon = 1e-5
  model.dtype = 'float32'      # activation dtype: float32 | bfloat16 (statistics stay float32)
  model.deep_supervision = 0   # k > 0: decoder levels 1..k get 1x1 heads, trained too (weights
                               # 2**-level, nnU-Net's); no gain under 5-fold CV (docs/RESULTS.md)

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.root = DEFAULT_DATA_ROOT
  data.source = 'png'          # png (derived_png_meow2) | dicom (CAP layout) | acdc (NIfTI) |
                               # nifti (image and label folders, nnU-Net's raw layout)
  data.png_dir = 'derived_png_meow2'
  data.nifti_images = 'imagesTr'  # nifti: image volumes (3D or 4D), under data.root
  data.nifti_labels = 'labelsTr'  # nifti: label volumes named like the images (less _0000)
  data.case_regex = ''         # nifti: a volume's patient = the regex's first group on its name
                               # ('' = the name); e.g. '(patient\d+)_frame' for ACDC in
                               # nnU-Net's form
  data.contour = 'i'           # i = endocardium (the challenge's LV cavity)
  data.labels = ml_collections.ConfigDict(dict(  # label values of label volumes (acdc, nifti)
      cavity=3, myocardium=2))                   # ACDC: 1 RV, 2 myocardium, 3 LV cavity
  data.myocardium = False      # also the epicardium (o_labels / ocontour): 3 classes, partial labels
  data.mask_outset_px = 0.5    # how far a training mask's outline lies outside the expert polygon:
                               # SCD masks hold every pixel the polygon touches, 0.5 px beyond an
                               # edge on average; predicted contours are moved in by it
  data.split = 'official'      # official | kfold
  data.train_sets = ('training',)  # official sets (training | validation | online | all), unioned
  data.eval_sets = ('validation',)
  data.kfold_sets = ('training', 'validation')  # kfold: the case pool split into patient folds
  data.num_folds = 5
  data.fold = 0                # kfold: the eval fold; the other folds train
  data.kfold_seed = 0          # kfold: shuffle of cases within pathology groups
  data.train_exclude = ()      # cases never trained on (e.g. labels known to be misplaced);
                               # still evaluated where the split holds them out
  data.image_size = 256        # network input is image_size x image_size
  data.resize_mode = 'resize'  # resize (longer side to S, aspect kept) | crop (centre crop/pad)
                               # | roi (a roi_mm square around the LV, resampled to S)
  data.roi_mm = 120.0          # roi: the square's side; centred on the expert's LV in
                               # training, on roi_localizer's segmentation otherwise
  data.roi_localizer = ''      # roi: the model that finds the LV (a shipped model's name or
                               # a workdir, of another resize_mode)
  data.clip_percentiles = (1.0, 99.0)
  data.nominal_spacing_mm = 1.3672  # used for PNG data without a spacing table (warned)
  data.spacing_table = ''      # optional CSV: case,pixel_spacing_mm (or case,row_mm,col_mm)
  data.dicom_glob = 'SCD_IMAGES_*'           # dicom: folders holding <SCD id>/<series>/*.dcm
  data.contours_dir = 'SCD_ManualContours'   # dicom: <case>/contours-manual/IRCCI-expert/
  data.patient_sheet = 'scd_patientdata.csv'  # dicom: SCD id <-> case name
  data.cache_dir = os.path.join(os.path.expanduser('~'), '.cache', 'lvseg_jax')
  data.on_error = 'raise'      # raise | skip (skipped items are reported with a count)
  data.drop_remainder = True   # training batches: drop the last partial batch, else pad + mask

  # ---------------------------------------------------------------- augmentation
  # On-device, per sample, inside the jitted train step (lvseg_jax/augment.py). Each component
  # has its own switch for ablations; a neutral range ((1, 1), 0) also turns one off.
  config.augment = aug = ml_collections.ConfigDict()
  aug.enabled = True                 # False: augment() returns its inputs unchanged
  aug.affine = True
  aug.rotation_deg = 15.0            # uniform in [-r, r]; positive = counter-clockwise
  aug.scale = (0.9, 1.1)             # isotropic zoom range (> 1 enlarges the content)
  aug.aspect = (0.95, 1.05)          # anisotropic factor a: rows x sqrt(a), columns / sqrt(a)
  aug.translation_frac = 0.05        # uniform shift in [-f, f] x image size, per axis
  aug.flip_lr = False                # random left-right flip (p = 0.5)
  aug.flip_ud = False                # random up-down flip (p = 0.5)
  aug.elastic = True
  aug.elastic_alpha = 34.0           # Simard's alpha, pixels at reference_size; displacement
                                     # std = alpha/sqrt(3) * ||k_sigma||^2 = 1.38 px at 256
  aug.elastic_sigma = 4.0            # Gaussian smoothing width in pixels at reference_size
  aug.elastic_prob = 0.5             # fraction of samples that get the elastic deformation
  aug.elastic_method = 'coarse'      # coarse (Gaussian basis on a coarse grid, faster) | conv
  aug.reference_size = 256           # alpha/sigma scale with image_size / reference_size
  aug.mode = 'constant'              # map_coordinates boundary: constant|nearest|wrap|mirror|reflect
  aug.cval = 0.0                     # image fill for mode='constant' (masks are filled with 0)
  aug.intensity = False              # no gain under 5-fold CV (docs/RESULTS.md)
  aug.gamma = (0.8, 1.25)            # log-uniform gamma on the per-image min-max range
  aug.contrast = (0.9, 1.1)          # factor about the per-image mean
  aug.noise_std = 0.03               # additive Gaussian noise, normalized-intensity units

  # ---------------------------------------------------------------- training
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 8               # global batch
  train.num_epochs = 100
  train.num_steps = -1               # > 0 overrides num_epochs
  train.optimizer = 'adam'           # adam | adamw | sgd
  train.learning_rate = 1e-3
  train.warmup_steps = 100
  train.end_lr_factor = 0.01         # cosine decays to learning_rate * end_lr_factor
  train.weight_decay = 0.0
  train.grad_clip_norm = 0.0         # 0 disables
  train.flatten_optimizer = True     # optimizer state as one flat vector (same update, faster)
  train.dice_weight = 1.0
  train.ce_weight = 1.0
  train.parallel = 'jit'             # jit (NamedSharding over a mesh) | shard_map (axis 'batch')
  train.num_devices = 0              # data-parallel over this many local devices; 0 = all
  train.log_every = 10
  train.eval_every_epochs = 5
  train.checkpoint_every_steps = 200
  train.keep_checkpoints = 3
  train.resume_fallback = True       # resume from the newest readable checkpoint (warned)
  train.num_overlays = 12            # validation overlays in the final PNG grid
  train.tensorboard = True           # also write <workdir>/tb/ (scalars, overlays) for TensorBoard
  train.tensorboard_images = 4       # validation overlays per evaluation in TensorBoard
  train.distributed = False          # call jax.distributed.initialize()
  train.halt_after_steps = -1        # > 0: save and stop after this many steps (preemption)

  # ---------------------------------------------------------------- evaluation
  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 16
  ev.split = 'validation'            # --mode=evaluate: which set(s), comma separated
  ev.checkpoint = 'best'             # best | latest
  ev.good_apd_mm = 5.0

  # ---------------------------------------------------------------- prediction
  config.predict = pr = ml_collections.ConfigDict()
  pr.checkpoint = 'best'             # best | latest
  pr.batch_size = 4                  # frames per jitted forward pass (last batch padded); 4
                                     # ran the shipped network fastest on 2 CPU cores (3.2-3.8 s
                                     # for 240 frames, 4.1 s at 16: docs/BENCHMARKS.md)
  pr.largest_component = True        # keep the largest 4-connected component of each mask
  pr.fill_holes = True               # fill holes (papillary muscles count as cavity in SCD)
  pr.tta = False                     # test-time augmentation, softmax averaged; saves the
                                     # per-pixel variance as uncertainty/*.png
  pr.tta_transforms = 'flips'        # flips: id, lr, ud, both (4) | lr (2) | d4: 4 rotations x
                                     # 2 flips (8, for models trained with 90-degree rotations);
                                     # only for models trained with flip augmentation
  pr.areas = 'contour'               # contour: inside the sub-pixel contour | pixels: pixel count
  pr.min_myocardial_coverage = 0.5   # basal rule: a basal slice counts while myocardium rings
                                     # at least this share of its cavity (3-class models)
  pr.min_apical_cavity_mm2 = 20.0    # apical rule: smaller cavities add no volume (the SCD experts'
                                     # smallest contoured cavity is 18.7 mm², 526 frames)
  pr.save_masks = True               # masks/IM-0001-NNNN.png (0; cavity 255; myocardium 128)
  pr.save_contours = True            # contours/IM-0001-NNNN-[io]contour-auto.txt
  pr.save_overlays = True            # overlays/IM-0001-NNNN.png
  pr.save_nifti = True               # <series>_mask.nii.gz with the DICOM geometry
  pr.nifti_image = True              # also <series>_image.nii.gz (the input intensities)
  pr.write_workers = 0               # threads writing the per-frame files; 0 = one per CPU core
  pr.save_dicom_seg = False          # dicom_seg/phaseTT.dcm: DICOM SEG per phase (DICOM input)
  pr.contour_dir = ''                # expert contours for overlays and expert volumes: a folder
                                     # of IM-0001-NNNN-icontour-manual.txt or a CAP
                                     # SCD_ManualContours tree ('' = none)
  pr.patient_sheet = ''              # SCD id -> case CSV ('' = scd_patientdata.csv next to
                                     # contour_dir)
  pr.slice_spacing_mm = 0.0          # last-resort spacing between slices for volumes (> 0)
  pr.on_error = 'raise'              # raise | skip unreadable input files (skips are counted)
  pr.progress = True                 # progress bar (tqdm if installed, else log lines)
  pr.dtype = ''                      # forward-pass activations: '' = as trained | float32 |
                                     # bfloat16 (faster on GPUs; parameters stay float32)
  return config
