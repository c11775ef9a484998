"""ONNX export of converted models (:func:`export_onnx`), with mhc_fx local functions."""
