"""Observation: one calibration pass that gathers exact streaming statistics per expert."""

from moeprune.observe.observer import Observer, check_same_model, model_description, observe, probe_positions
from moeprune.observe.stats import ExpertStats, LayerStats, Probe, ProbeCollector, Stats

__all__ = ["ExpertStats", "LayerStats", "Observer", "check_same_model", "Probe", "ProbeCollector", "Stats", "model_description",
           "observe", "probe_positions"]
