"""Cases: the seam every case plugs into (``seam``), its sources and factories, the starter case
(``newcase``) and every built-in case in its own folder (data, net, TOML, priors; DESIGN §9)."""
