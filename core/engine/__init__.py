"""The paper's maths on any ``nn.Module``: influence, quantities of interest, distributions of
interest, experts' ranking, devices (DESIGN §1–2). Imports nothing else from ``core``."""
