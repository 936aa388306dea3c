"""What the scripts share: image metrics, the Fashion-MNIST classifier, benchmarks, a launcher."""
