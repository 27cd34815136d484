"""What pages ask on demand: explain one image, trace it through the experts."""
