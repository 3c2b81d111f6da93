"""Visual outputs: heat-map overlays and the HTML evaluation report."""
