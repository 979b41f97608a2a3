"""ESPnet3's ``espnet3.components.metrics``: :class:`~.base_metric.BaseMetric`."""
