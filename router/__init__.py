"""Persona inference: the sentence encoder, the classifier, calibration and thresholds, decisions."""
