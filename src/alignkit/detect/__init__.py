"""Detectors: everything that scores a text in [0, 1] (higher = more likely unsafe). `features` reads a
text, `calibration` fits and measures, `classifiers` are the trained guard classifiers, `judges` the
probe judges, `specs` names any of them with one string, and `labelled` holds their labelled data."""
