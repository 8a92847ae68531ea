# frozen_string_literal: true

# The Ruby client's benchmark (contract: BENCH.md): W1, sequential round
# trips of one caller, next to the redis gem's own PING; W2, round trips/s of
# many threads sharing one Client. Prints one JSON line on stdout (logs go to
# stderr). Not for starting Redis or cerbas (`make bench` does), nor for
# measuring their CPU.
#
#   ruby -Iclients/ruby/lib clients/ruby/bench.rb --redis URL --workload w1|w2 \
#     [--callers 16] [--seconds 5] [--count 2000] [--func echo]

require "json"
require "optparse"
require "redis"
require "cerbas_client"

WARMUP = 200

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)

# The q-quantile of sorted +values+, in ms.
def quantile_ms(sorted, q)
  return nil if sorted.empty?

  (sorted[[(q * sorted.size).ceil - 1, 0].max] * 1000.0).round(3)
end

options = { redis: ENV.fetch("CERBAS_REDIS_URL", "redis://127.0.0.1:6379"), workload: "w1", callers: 16,
            seconds: 5.0, count: 2000, func: "echo" }
OptionParser.new do |o|
  o.on("--redis URL") { |v| options[:redis] = v }
  o.on("--workload W", %w[w1 w2]) { |v| options[:workload] = v }
  o.on("--callers N", Integer) { |v| options[:callers] = v }
  o.on("--seconds S", Float) { |v| options[:seconds] = v }
  o.on("--count N", Integer) { |v| options[:count] = v }
  o.on("--func NAME") { |v| options[:func] = v }
end.parse!

args = { "message" => "hi" }
client = CerbasClient::Client.new(url: options[:redis], user: "test", source: "test")
errors = 0
latencies = []
ping_p50 = nil
callers = options[:workload] == "w1" ? 1 : options[:callers]

begin
  WARMUP.times { client.request(options[:func], args) }
rescue CerbasClient::Error => e
  warn "bench: warm-up failed: #{e.class}: #{e.message}"
  exit 1
end

if options[:workload] == "w1"
  # The redis gem's own PING round trip on a plain connection, for scale.
  url, _env, db = CerbasClient.resolve(url: options[:redis])
  redis = Redis.new(url: url, db: db)
  WARMUP.times { redis.ping }
  pings = Array.new(options[:count]) do
    started = now
    redis.ping
    now - started
  end
  redis.close
  ping_p50 = quantile_ms(pings.sort, 0.5)

  cpu_start = cpu
  started = now
  options[:count].times do
    t0 = now
    begin
      client.request(options[:func], args)
      latencies << (now - t0)
    rescue CerbasClient::Error => e
      errors += 1
      warn "bench: #{e.class}: #{e.message}"
    end
  end
  elapsed = now - started
  cpu_used = cpu - cpu_start
else
  stop_at = nil
  per_thread = Array.new(callers) { [] }
  errors_by_thread = Array.new(callers, 0)
  cpu_start = cpu
  started = now
  stop_at = started + options[:seconds]
  threads = Array.new(callers) do |i|
    Thread.new do
      mine = per_thread[i]
      while now < stop_at
        t0 = now
        begin
          client.request(options[:func], args)
          mine << (now - t0)
        rescue CerbasClient::Error => e
          errors_by_thread[i] += 1
          warn "bench: #{e.class}: #{e.message}"
        end
      end
    end
  end
  threads.each(&:join)
  elapsed = now - started
  cpu_used = cpu - cpu_start
  latencies = per_thread.flatten
  errors = errors_by_thread.sum
end
client.close

sorted = latencies.sort
requests = latencies.size
puts JSON.generate({
                     client: "ruby",
                     workload: options[:workload],
                     callers: callers,
                     requests: requests,
                     seconds: elapsed.round(3),
                     rps: (requests / elapsed).round(1),
                     p50_ms: quantile_ms(sorted, 0.5),
                     p99_ms: quantile_ms(sorted, 0.99),
                     ping_p50_ms: ping_p50,
                     client_cpu_us_per_rt: requests.positive? ? (cpu_used * 1e6 / requests).round(1) : nil,
                     errors: errors
                   })
