"""Input and output around the pipeline: output directories written all or nothing (`outdir`),
calibration and evaluation data from local files (`data`), loading model directories (`models`)."""
