"""Images in: safe ingestion and the dataset store, and the generated and bundled data (fractals, shapes, the sample, the Lab's tasks, Fashion-MNIST)."""
