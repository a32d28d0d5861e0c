"""The publisher: plans model rollouts to fleets and follows them through telemetry."""
