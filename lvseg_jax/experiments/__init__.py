"""Ablation grids: train and evaluate every cell of a config grid, then a paper-style table.

A grid maps dotted config keys to the values to try, e.g.

  {'model.name': ['unet', 'lnu', 'ibu'], 'augment.elastic': [True, False], 'seed': [0, 1]}

`expand_grid` turns it into cells (one dict of overrides each), `run_grid` trains and evaluates
the cells one after another with `train.train_and_evaluate` (the same code on CPU, GPU or TPU),
each in `workdir/<cell folder>/`, and `write_report` writes the comparison table
(`results.md`, `results.json`) and a box plot (`boxplot.png`).

Re-running skips finished cells: a cell is finished when its folder holds `DONE` (written after
its evaluation JSON) and the config recorded there matches the cell's config. An interrupted
cell resumes from its latest checkpoint (`train_and_evaluate` does that).

Overrides that cannot change a cell's run are dropped and the identical cells merged (see
`_APPLIES_ONLY_IF`): e.g. `model.ibn_mode` only matters for `model.name='ibu'`, so
{'model.name': ['unet', 'ibu'], 'model.ibn_mode': ['split', 'blend']} gives 3 cells, not 4.

Table columns (per group of cells, aggregated over seeds and folds):
  * Dice, per image: mean ± sample std of the Dice of every evaluated frame of every run
    (undetected frames count as 0), the pooled per-image convention of most papers.
  * Dice, over runs: mean ± std over runs of each run's per-image mean Dice (seed spread).
  * APD (mm), over cases: the 2009 challenge's convention: each case's mean APD over its good
    contours (APD < `eval.good_apd_mm`); mean ± std over the (run, case) pairs.
  * Good contours (%), over cases: each case's percentage of good contours; mean ± std over the
    (run, case) pairs (the challenge's convention).
Standard deviations use ddof=1, like `results.evaluate`; 'n/a' where fewer than 2 values (std)
or none (mean) exist, e.g. APD when no contour is good.
"""

from lvseg_jax.experiments.grid import (DONE_FILE, FAILED_FILE, GRID_FILE, PRESETS,
                                        REPLICATE_KEYS, CellResult, apply_overrides,
                                        cell_dirname, cell_name, check_grid, expand_grid,
                                        parse_grid, run_grid)
from lvseg_jax.experiments.report import (boxplot, default_group_by, describe_setting,
                                          results_table, summarize, write_report)
