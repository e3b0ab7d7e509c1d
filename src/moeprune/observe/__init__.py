"""Observation: one calibration pass that gathers exact streaming statistics per expert."""

from moeprune.observe.observer import Observer, check_same_model, model_description, observe, probe_positions
from moeprune.observe.reduce import merge_layer_stats, reduce_layer_stats
from moeprune.observe.stats import ExpertStats, LayerStats, Probe, ProbeCollector, Stats

__all__ = ["ExpertStats", "LayerStats", "Observer", "check_same_model", "Probe", "ProbeCollector", "Stats",
           "merge_layer_stats", "model_description", "observe", "probe_positions", "reduce_layer_stats"]
