"""Data: records and file formats, image and DICOM loading, the synthetic phantoms, and the stage-1 and
stage-2 training datasets. Builds on ``stmed.model`` (prompts, label masks, image token counts)."""
