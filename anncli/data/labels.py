"""The label convention shared by the data, the losses and the metrics.

Labels are uint8 train ids 0..K-1 per pixel; IGNORE_INDEX marks pixels that no loss and no metric counts
(void classes, padding, object rims). Packing maps every dataset's own ids to this convention.
"""

IGNORE_INDEX = 255
