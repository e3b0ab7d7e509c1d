"""Observation: one calibration pass that gathers exact streaming statistics per expert."""

from moeprune.observe.observer import Observer, model_description, observe, probe_positions
from moeprune.observe.stats import ExpertStats, LayerStats, Probe, ProbeCollector, Stats

__all__ = ["ExpertStats", "LayerStats", "Observer", "Probe", "ProbeCollector", "Stats", "model_description",
           "observe", "probe_positions"]
