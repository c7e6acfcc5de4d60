"""The selection model (METHOD §7, BioMed-VITAL's second stage): a small head on frozen policy features that
rates an (image, question, answer) with a scalar, trained on judge-scored and clinician answer pairs."""
