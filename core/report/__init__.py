"""The report: summary rows, claims with their tolerances, Markdown and HTML export."""
