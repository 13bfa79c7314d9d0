"""Building blocks shared by methods: the EMA teacher and its schedules (``teacher``), the
per-step schedules (``schedules``), metrics read from predictions (``metrics``)."""
