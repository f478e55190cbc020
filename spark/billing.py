"""clickgate billing as a Spark job: the same invoices as `clickgate billing`, at any scale.

    spark-submit spark/billing.py --archive s3a://bucket/archive --day 2026-11-27 \
        --rules rules.json --out /path/to/out [--margin-hours 1] \
        [--batch-checks --ip-campaigns-max 20]

Reads the Parquet archive's hour partitions [day - margin, day + 1 day + margin) as
they are, and writes `invoices.csv` (and `adjustments.csv` with --batch-checks) to the
driver's local --out directory, byte for byte what `clickgate billing` writes for the
same archive, day and rules.

Semantics (docs/billing.md):
1. Dedup: of all copies of an event_id (text compared case-insensitively, as the
   UUID it is), the earliest received wins: smallest (recv_ts, source, lsn).
2. The day's clicks: winners whose event time `ts` is in [day, day + 1 day).
3. Per IP and UTC minute of `ts`, the count of the day's clicks; every `ip_rate` rule
   whose max_clicks_per_minute is below it makes all of them fraud.
4. Every other rule kind (ip_block, user_agent, honeypot, risk_model) judges each click
   exactly as the stream's code does (a risk model's `ip_rate` feature is the count of 3).
5. With --batch-checks: an IP with more than --ip-campaigns-max distinct campaigns among
   its clicks of the day has every non-fraud click removed (listed in adjustments.csv).
6. The rest is billed: per (advertiser_id, campaign_id), clicks and cost_micros.

Shuffles: one by event_id (dedup), one by (ip, minute) (the rate rule); with batch
checks one by ip. The per-click rules run as a Python UDF on the executors.
"""

import argparse
import datetime
import ipaddress
import json
import math
import os
import sys

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MINUTE_MS = 60_000

# The stream's model tokens (core::fraud): ASCII case-insensitive substrings.
BOT_UA_TOKENS = [
    "bot", "crawl", "spider", "slurp", "headless", "phantomjs", "selenium", "puppeteer",
    "playwright", "curl/", "wget/", "python-requests", "python-urllib", "go-http-client",
    "java/", "okhttp", "libwww", "scrapy", "httpclient",
]
MOBILE_UA_TOKENS = ["mobile", "android", "iphone", "ipad", "ipod"]
FEATURES = [
    "ua_bot", "ua_empty", "ua_short", "ua_device_mismatch", "ip_rate", "ip_v6",
    "hour_night", "country_mismatch", "device_ctv", "device_other", "cost_units",
]
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_lower(s):
    """Folds ASCII letters only, as the stream's case-insensitive matching does."""
    return s.translate(_ASCII_LOWER)


class CidrSet:
    """core::cidr::CidrSet: host bits ignored; IPv4-mapped IPv6 is IPv4 (entries and
    addresses); an IPv6 entry covering ::ffff:0:0/96 matches every IPv4 address."""

    def __init__(self, items):
        self.v4 = {}
        self.v6 = {}
        self.v6_covers_v4 = False
        for item in items:
            text = item.strip()
            addr_text, _, prefix_text = text.partition("/")
            addr = ipaddress.ip_address(addr_text)
            maxp = 32 if addr.version == 4 else 128
            prefix = int(prefix_text) if prefix_text else maxp
            if prefix > maxp:
                raise ValueError(f"bad CIDR {item!r}")
            a = int(addr)
            if addr.version == 4:
                self._add(self.v4, a, prefix, 32)
            elif prefix >= 96 and (a >> 32) == 0xFFFF:
                self._add(self.v4, a & 0xFFFFFFFF, prefix - 96, 32)
            else:
                mask = self._mask(prefix, 128)
                if (0xFFFF00000000 & mask) == (a & mask):
                    self.v6_covers_v4 = True
                self._add(self.v6, a, prefix, 128)

    @staticmethod
    def _mask(prefix, bits):
        return 0 if prefix == 0 else ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)

    def _add(self, table, a, prefix, bits):
        table.setdefault(prefix, set()).add(a & self._mask(prefix, bits))

    def contains(self, addr):
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.version == 4:
            if self.v6_covers_v4:
                return True
            a, table, bits = int(addr), self.v4, 32
        else:
            a, table, bits = int(addr), self.v6, 128
        return any((a & self._mask(p, bits)) in nets for p, nets in table.items())


class Rules:
    """core::fraud::CompiledRules, evaluate_static: every rule but ip_rate."""

    def __init__(self, text):
        doc = json.loads(text)
        self.blocklists = []
        self.ua_patterns = []
        self.honeypots = set()
        self.ip_rates = []
        self.models = []
        for r in doc.get("rules", []):
            kind = r["kind"]
            if kind == "ip_block":
                self.blocklists.append(CidrSet(r["cidrs"]))
            elif kind == "user_agent":
                self.ua_patterns.extend(ascii_lower(p) for p in r["patterns"])
            elif kind == "honeypot":
                self.honeypots.update(int(a) for a in r["ad_ids"])
            elif kind == "ip_rate":
                self.ip_rates.append(int(r.get("max_clicks_per_minute", 100)))
            elif kind == "risk_model":
                t = float(r["threshold"])
                m = r["model"]
                for name in m["weights"]:
                    if name not in FEATURES:
                        raise ValueError(f"rule {r['id']}: unknown model feature {name!r}")
                self.models.append({
                    "bias": float(m.get("bias", 0.0)),
                    # The Rust model keeps its weights in a BTreeMap: name order.
                    "weights": sorted((n, float(w)) for n, w in m["weights"].items()),
                    "threshold": t,
                    "threshold_logit": math.inf if t >= 1.0 else math.log(t / (1.0 - t)),
                    "geo": [(c, CidrSet(nets)) for c, nets in sorted(m.get("geo", {}).items())],
                })
            else:
                raise ValueError(f"rule {r.get('id')}: unknown kind {kind!r}")

    def static_fraud(self, ip, ua, ad_id, device, country, ts_ms, cost, count):
        addr = ipaddress.ip_address(ip)
        if any(b.contains(addr) for b in self.blocklists):
            return True
        lua = ascii_lower(ua)
        if any(p in lua for p in self.ua_patterns):
            return True
        if ad_id in self.honeypots:
            return True
        if not self.models:
            return False
        ua_bot = any(t in lua for t in BOT_UA_TOKENS)
        ua_mobile = any(t in lua for t in MOBILE_UA_TOKENS)
        ua_bytes = len(ua.encode("utf-8"))
        for m in self.models:
            def value(name):
                if name == "ua_bot":
                    return 1.0 if ua_bot else 0.0
                if name == "ua_empty":
                    return 1.0 if ua_bytes == 0 else 0.0
                if name == "ua_short":
                    return 1.0 if ua_bytes < 16 else 0.0
                if name == "ua_device_mismatch":
                    if device in ("mobile", "tablet"):
                        return 0.0 if ua_mobile else 1.0
                    if device == "desktop":
                        return 1.0 if ua_mobile else 0.0
                    return 0.0
                if name == "ip_rate":
                    return float(count)
                if name == "ip_v6":
                    return 1.0 if addr.version == 6 and addr.ipv4_mapped is None else 0.0
                if name == "hour_night":
                    return 1.0 if (ts_ms // HOUR_MS) % 24 < 6 else 0.0
                if name == "country_mismatch":
                    hit = any(c != country and s.contains(addr) for c, s in m["geo"])
                    return 1.0 if hit else 0.0
                if name == "device_ctv":
                    return 1.0 if device == "ctv" else 0.0
                if name == "device_other":
                    return 1.0 if device == "other" else 0.0
                if name == "cost_units":
                    return float(cost) / 1e6
                raise ValueError(name)

            s = 0.0
            for name, w in m["weights"]:
                s += w * value(name)
            logit = m["bias"] + s
            if math.isinf(m["threshold_logit"]):
                try:
                    score = 1.0 / (1.0 + math.exp(-logit))
                except OverflowError:
                    score = 0.0
                if score >= m["threshold"]:
                    return True
            elif logit >= m["threshold_logit"]:
                return True
        return False


def hour_paths(archive, day, margin_hours):
    start = int(datetime.datetime.strptime(day, "%Y-%m-%d")
                .replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
    out = []
    h = start - margin_hours * HOUR_MS
    while h < start + DAY_MS + margin_hours * HOUR_MS:
        t = datetime.datetime.fromtimestamp(h / 1000, tz=datetime.timezone.utc)
        out.append(f"{archive.rstrip('/')}/year={t.year:04d}/month={t.month:02d}/"
                   f"day={t.day:02d}/hour={t.hour:02d}")
        h += HOUR_MS
    return start, out


def bill(spark, archive, day, rules_text, margin_hours=1, batch_checks=False,
         ip_campaigns_max=20):
    """Returns (invoice rows [(adv, camp, clicks, cost)], adjustment rows)."""
    from pyspark.sql import functions as F
    from pyspark.sql import Window
    from pyspark.sql.types import BooleanType

    rules = Rules(rules_text)
    start, paths = hour_paths(archive, day, margin_hours)
    jvm = spark._jvm
    conf = spark._jsc.hadoopConfiguration()
    existing = []
    for p in paths:
        path = jvm.org.apache.hadoop.fs.Path(p)
        if path.getFileSystem(conf).exists(path):
            existing.append(p)
    if not existing:
        return [], []
    df = spark.read.parquet(*existing)
    u64 = lambda c: F.col(c).cast("string")  # UINT64 reads as DECIMAL(20,0)
    df = df.select(
        F.lower("event_id").alias("event_id"),
        F.greatest(F.expr("unix_millis(ts)"), F.lit(0)).alias("ts_ms"),
        F.greatest(F.expr("unix_millis(recv_ts)"), F.lit(0)).alias("recv_ms"),
        "source",
        F.col("lsn").cast("decimal(20,0)").alias("lsn"),
        u64("campaign_id").alias("campaign_id"),
        u64("ad_id").alias("ad_id"),
        u64("advertiser_id").alias("advertiser_id"),
        "ip", "user_agent", "country", "device",
        u64("cost_micros").alias("cost_micros"),
    )
    first = Window.partitionBy("event_id").orderBy("recv_ms", "source", "lsn")
    day_clicks = (
        df.withColumn("copy", F.row_number().over(first))
        .where((F.col("copy") == 1) & (F.col("ts_ms") >= start) & (F.col("ts_ms") < start + DAY_MS))
        .withColumn("minute", F.floor(F.col("ts_ms") / MINUTE_MS))
    )
    day_clicks = day_clicks.withColumn(
        "ip_clicks", F.count(F.lit(1)).over(Window.partitionBy("ip", "minute")))
    if batch_checks:
        day_clicks = day_clicks.withColumn(
            "ip_campaigns", F.size(F.collect_set("campaign_id").over(Window.partitionBy("ip"))))
    else:
        day_clicks = day_clicks.withColumn("ip_campaigns", F.lit(0))
    rate_max = min(rules.ip_rates) if rules.ip_rates else None

    def judge(ip, ua, ad_id, device, country, ts_ms, cost, count):
        return rules.static_fraud(ip, ua, int(ad_id), device, country, int(ts_ms),
                                  int(cost), int(count))

    judge_udf = F.udf(judge, BooleanType(), useArrow=False)
    rate_fraud = F.lit(False) if rate_max is None else (F.col("ip_clicks") > rate_max)
    judged = day_clicks.withColumn(
        "fraud",
        rate_fraud | judge_udf("ip", "user_agent", "ad_id", "device", "country", "ts_ms",
                               "cost_micros", "ip_clicks"),
    ).where(~F.col("fraud"))
    many = F.col("ip_campaigns") > ip_campaigns_max if batch_checks else F.lit(False)
    judged = judged.withColumn("many", many).cache()
    inv = (
        judged.where(~F.col("many"))
        .groupBy("advertiser_id", "campaign_id")
        .agg(F.count(F.lit(1)).alias("clicks"),
             F.sum(F.col("cost_micros").cast("decimal(38,0)")).alias("cost"))
        .collect()
    )
    invoices = sorted((int(r.advertiser_id), int(r.campaign_id), int(r.clicks), int(r.cost))
                      for r in inv)
    adjustments = []
    if batch_checks:
        adj = judged.where(F.col("many")).select(
            "event_id", "advertiser_id", "campaign_id", "ad_id", "ts_ms", "ip", "cost_micros"
        ).collect()
        adjustments = sorted(
            (r.event_id, int(r.advertiser_id), int(r.campaign_id), int(r.ad_id), int(r.ts_ms),
             r.ip, int(r.cost_micros)) for r in adj)
    judged.unpersist()
    return invoices, adjustments


def invoices_csv(rows):
    return "advertiser_id,campaign_id,clicks,cost_micros\n" + "".join(
        f"{a},{c},{n},{cost}\n" for a, c, n, cost in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", required=True, help="archive root (path, file:// or s3a://)")
    ap.add_argument("--day", required=True, help="UTC day, YYYY-MM-DD")
    ap.add_argument("--rules", required=True, help="rules JSON file (the clickgate rules format)")
    ap.add_argument("--out", required=True, help="local directory for invoices.csv")
    ap.add_argument("--margin-hours", type=int, default=1)
    ap.add_argument("--batch-checks", action="store_true")
    ap.add_argument("--ip-campaigns-max", type=int, default=20)
    ap.add_argument("--master", help="Spark master (default: spark-submit's)")
    ap.add_argument("--shuffle-partitions", type=int,
                    help="spark.sql.shuffle.partitions (default: Spark's, 200)")
    args = ap.parse_args(argv)
    if not 0 <= args.margin_hours <= 48:
        ap.error("--margin-hours must be between 0 and 48")
    try:
        datetime.datetime.strptime(args.day, "%Y-%m-%d")
    except ValueError:
        ap.error(f"--day {args.day!r} is not YYYY-MM-DD")
    with open(args.rules, encoding="utf-8") as f:
        rules_text = f.read()
    Rules(rules_text)  # refuse a bad rules file before starting Spark

    from pyspark.sql import SparkSession

    b = (SparkSession.builder.appName(f"clickgate-billing-{args.day}")
         .config("spark.sql.session.timeZone", "UTC"))
    if args.master:
        b = b.master(args.master).config("spark.ui.enabled", "false")
    if args.shuffle_partitions:
        b = b.config("spark.sql.shuffle.partitions", str(args.shuffle_partitions))
    spark = b.getOrCreate()
    try:
        invoices, adjustments = bill(spark, args.archive, args.day, rules_text,
                                     args.margin_hours, args.batch_checks,
                                     args.ip_campaigns_max)
    finally:
        spark.stop()
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "invoices.csv"), invoices_csv(invoices))
    if args.batch_checks:
        text = "event_id,advertiser_id,campaign_id,ad_id,ts,ip,cost_micros,check,reason\n" + "".join(
            f"{e},{a},{c},{ad},{ts},{ip},{cost},ip_many_campaigns,"
            f"ip clicked more than {args.ip_campaigns_max} campaigns in the day\n"
            for e, a, c, ad, ts, ip, cost in adjustments)
        write_atomic(os.path.join(args.out, "adjustments.csv"), text)
    print(f"billing {args.day}: {len(invoices)} invoice rows, "
          f"{sum(r[2] for r in invoices)} billable clicks, {len(adjustments)} adjusted")
    return 0


def write_atomic(path, text):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
