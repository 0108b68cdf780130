"""The optional push path: alerts posted to Alertmanager the moment a hang crosses a share of
its timeout (`push`), with the names, labels and texts the shipped rules have
(`exporter.model.alerts`), so that Alertmanager merges the two.

May import: ``exporter.model``, ``exporter.config`` and ``exporter.metrics`` (its counters).
"""
