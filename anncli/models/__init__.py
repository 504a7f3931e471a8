"""Networks: dilated deep-stem ResNets, APNB/AFNB attention, the ANN network and its baselines."""
