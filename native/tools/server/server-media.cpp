#include "server-media.h"

#include "server-common.h"  // SRV_INF

#include "common.h"
#include "http.h"
#include "json.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <stdexcept>
#include <system_error>

namespace fs = std::filesystem;

static const char * FLAG_LOCAL_MEDIA    = "--allowed-local-media";
static const char * FLAG_MEDIA_HOSTS    = "--allowed-media-hosts";
static const char * FLAG_MAX_BYTES      = "--max-image-bytes";
static const char * FLAG_MAX_PIXELS     = "--max-image-pixels";
static const char * FLAG_MAX_FILES      = "--max-images";
static const char * FLAG_TIMEOUTS       = "--media-connect-timeout, --media-read-timeout";
static const int    MAX_REDIRECTS       = 5;
static const size_t SHOWN_URL_CHARS     = 80;

static std::string shown(const std::string & url) {
    return url.size() <= SHOWN_URL_CHARS ? url : url.substr(0, SHOWN_URL_CHARS) + "...";
}

static std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return (char) std::tolower(c); });
    return s;
}

static bool starts_with_ci(const std::string & s, const char * prefix) {
    return lower(s.substr(0, strlen(prefix))) == prefix;
}

static std::invalid_argument too_large(const server_media_policy & policy, const std::string & what, const std::string & size) {
    return std::invalid_argument(what + " is " + size + " bytes, more than this server's limit of " +
                                 std::to_string(policy.max_bytes) + " (" + FLAG_MAX_BYTES + ")");
}

server_media_policy server_media_policy_from_params(const common_params & params) {
    server_media_policy policy;
    policy.local_dir         = params.media_path;
    policy.hosts             = server_media_parse_hosts(string_join(params.media_hosts, ","));
    policy.max_bytes         = params.media_max_bytes;
    policy.max_pixels        = params.media_max_pixels;
    policy.max_files         = params.media_max_files;
    policy.connect_timeout_s = params.media_connect_timeout;
    policy.read_timeout_s    = params.media_read_timeout;
    return policy;
}

std::vector<server_media_host> server_media_parse_hosts(const std::string & list) {
    std::vector<server_media_host> hosts;
    for (std::string entry : string_split<std::string>(list, ',')) {
        entry = string_strip(entry);
        if (entry.empty()) {
            continue;
        }
        const auto bad = [&](const std::string & why) {
            return std::invalid_argument(std::string(FLAG_MEDIA_HOSTS) + ": " + why + " in '" + entry +
                                         "' (entries are HOST or HOST:PORT, [IPv6]:PORT)");
        };
        if (entry.find_first_of("/@?#") != std::string::npos) {
            throw bad("not a host");
        }
        server_media_host h = { entry, -1 };
        std::string port;
        if (entry.front() == '[') {
            const size_t close = entry.find(']');
            if (close == std::string::npos || (close + 1 < entry.size() && entry[close + 1] != ':')) {
                throw bad("bad IPv6 literal");
            }
            h.host = entry.substr(1, close - 1);
            port = close + 1 < entry.size() ? entry.substr(close + 2) : "";
            if (close + 1 < entry.size() && port.empty()) {
                throw bad("bad port");
            }
        } else if (std::count(entry.begin(), entry.end(), ':') == 1) {
            h.host = entry.substr(0, entry.find(':'));
            port   = entry.substr(entry.find(':') + 1);
            if (port.empty()) {
                throw bad("bad port");
            }
        } else if (entry.find(':') != std::string::npos) {
            throw bad("an IPv6 address needs brackets");
        }
        if (h.host.empty()) {
            throw bad("no host");
        }
        if (!port.empty()) {
            if (port.size() > 5 || !std::all_of(port.begin(), port.end(), ::isdigit) || std::stoi(port) < 1 ||
                std::stoi(port) > 65535) {
                throw bad("bad port");
            }
            h.port = std::stoi(port);
        }
        h.host = lower(h.host);
        hosts.push_back(h);
    }
    return hosts;
}

// --- data: and raw base64 ---------------------------------------------------------------

static int base64_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;  // standard and URL-safe alphabets, as upstream's decoder
    if (c == '/' || c == '_') return 63;
    return -1;
}

// strict: whitespace skipped, '=' only as padding at the end, anything else refused
static std::vector<uint8_t> decode_base64(const server_media_policy & policy, const std::string & text, const char * what) {
    std::vector<uint8_t> out;
    out.reserve(text.size() / 4 * 3);
    uint32_t acc = 0;
    int n_bits = 0;
    size_t n_pad = 0;
    for (unsigned char c : text) {
        if (std::isspace(c)) {
            continue;
        }
        if (c == '=') {
            n_pad++;
            continue;
        }
        const int v = base64_value(c);
        if (v < 0 || n_pad > 0) {
            throw std::invalid_argument(std::string(what) + " is not valid base64");
        }
        acc = (acc << 6) | (uint32_t) v;
        n_bits += 6;
        if (n_bits >= 8) {
            n_bits -= 8;
            out.push_back((uint8_t) (acc >> n_bits));
            if ((int64_t) out.size() > policy.max_bytes) {
                throw too_large(policy, what, "more than " + std::to_string(policy.max_bytes));
            }
        }
    }
    if (n_pad > 2 || n_bits >= 6) {
        throw std::invalid_argument(std::string(what) + " is not valid base64");
    }
    return out;
}

static std::vector<uint8_t> load_data_uri(const server_media_policy & policy, const std::string & url) {
    const size_t comma = url.find(',');
    if (comma == std::string::npos) {
        throw std::invalid_argument("the data: URI has no ',' before its data (data:image/png;base64,...)");
    }
    const std::string header = lower(url.substr(5, comma - 5));
    if (!string_starts_with(header, "image/") && !string_starts_with(header, "video/") &&
        !string_starts_with(header, "audio/")) {
        throw std::invalid_argument("the data: URI's type must be image/..., audio/... or video/..., got '" +
                                    shown(header) + "'");
    }
    if (!string_ends_with(header, ";base64")) {
        throw std::invalid_argument("the data: URI must be base64 encoded (data:image/png;base64,...)");
    }
    return decode_base64(policy, url.substr(comma + 1), "the data: URI's data");
}

// --- file: ------------------------------------------------------------------------------

static std::string percent_decoded(const std::string & s) {
    std::string out;
    for (size_t i = 0; i < s.size(); i++) {
        if (s[i] == '%' && i + 2 < s.size() && std::isxdigit((unsigned char) s[i + 1]) &&
            std::isxdigit((unsigned char) s[i + 2])) {
            out.push_back((char) std::stoi(s.substr(i + 1, 2), nullptr, 16));
            i += 2;
        } else {
            out.push_back(s[i]);
        }
    }
    return out;
}

static bool inside(const fs::path & root, const fs::path & path) {
    auto r = root.begin();
    auto p = path.begin();
    for (; r != root.end() && !r->empty(); ++r, ++p) {
        if (p == path.end() || *p != *r) {
            return false;
        }
    }
    return true;
}

static std::vector<uint8_t> load_local_file(const server_media_policy & policy, const std::string & url) {
    if (policy.local_dir.empty()) {
        throw std::invalid_argument("media URL '" + shown(url) + "': this server reads no local files; send the "
                                    "image as a data: URI (base64), or start the server with " + FLAG_LOCAL_MEDIA +
                                    " DIR to allow files inside DIR");
    }
    // file:///abs/path and file://localhost/abs/path name an absolute path (as the Python
    // server takes them); file://rel/path a path relative to DIR (as upstream's --media-path)
    std::string rest = url.substr(7);
    if (string_starts_with(rest, "localhost/")) {
        rest = rest.substr(9);
    }
    rest = percent_decoded(rest);
    if (rest.empty() || rest.find('\0') != std::string::npos) {
        throw std::invalid_argument("media URL '" + shown(url) + "': no file path");
    }
    const fs::path given = rest.front() == '/' ? fs::path(rest) : fs::path(policy.local_dir) / rest;
    std::error_code ec;
    const fs::path root = fs::canonical(fs::path(policy.local_dir), ec);
    if (ec) {
        throw std::runtime_error(std::string(FLAG_LOCAL_MEDIA) + " folder is gone: " + policy.local_dir);
    }
    const fs::path real = fs::canonical(given, ec);  // symlinks and .. resolved
    if (ec) {
        throw std::invalid_argument("media URL '" + shown(url) + "': cannot open the file (" + ec.message() + ")");
    }
    if (!inside(root, real)) {
        throw std::invalid_argument("media URL '" + shown(url) + "': the file is not inside " + root.string() +
                                    " (" + FLAG_LOCAL_MEDIA + ")");
    }
    if (!fs::is_regular_file(real, ec)) {
        throw std::invalid_argument("media URL '" + shown(url) + "': not a regular file");
    }
    const auto size = fs::file_size(real, ec);
    if (ec) {
        throw std::invalid_argument("media URL '" + shown(url) + "': cannot open the file (" + ec.message() + ")");
    }
    if ((int64_t) size > policy.max_bytes) {
        throw too_large(policy, "the file", std::to_string(size));
    }
    std::ifstream file(real, std::ios::binary);
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (!file.eof() && file.fail()) {
        throw std::invalid_argument("media URL '" + shown(url) + "': cannot read the file");
    }
    if ((int64_t) data.size() > policy.max_bytes) {
        throw too_large(policy, "the file", "more than " + std::to_string(policy.max_bytes));
    }
    SRV_INF("loaded %zu bytes from local file '%s'\n", data.size(), real.string().c_str());
    return data;
}

// --- http(s): ---------------------------------------------------------------------------

static bool host_allowed(const server_media_policy & policy, const std::string & host, int port) {
    for (const auto & h : policy.hosts) {
        if (h.host == lower(host) && (h.port == -1 || h.port == port)) {
            return true;
        }
    }
    return false;
}

// a Location header against the URL it answered
static std::string resolve_location(const common_http_url & base, const std::string & location) {
    if (location.find("://") != std::string::npos) {
        return location;
    }
    const std::string origin = base.scheme + "://" + common_http_format_host(base.host) + ":" + std::to_string(base.port);
    if (string_starts_with(location, "//")) {
        return base.scheme + ":" + location;
    }
    if (string_starts_with(location, "/")) {
        return origin + location;
    }
    std::string dir = base.path.substr(0, base.path.find('?'));
    dir = dir.substr(0, dir.rfind('/') + 1);
    return origin + (dir.empty() ? "/" : dir) + location;
}

static void set_timeout(const std::function<void(time_t, time_t)> & set, double seconds) {
    const auto sec = (time_t) seconds;
    set(sec, (time_t) ((seconds - (double) sec) * 1e6));
}

static std::vector<uint8_t> fetch(const server_media_policy & policy, const std::string & original) {
    if (policy.hosts.empty()) {
        throw std::invalid_argument("media URL '" + shown(original) + "': this server fetches no URLs; send the "
                                    "image as a data: URI (base64), or start the server with " + FLAG_MEDIA_HOSTS +
                                    " HOST,... to allow fetching from those hosts");
    }
    std::string url = original;
    for (int hop = 0; hop <= MAX_REDIRECTS; hop++) {
        const std::string where = hop == 0 ? "" : " (redirected from '" + shown(original) + "')";
        const std::string what = "media URL '" + shown(url) + "'" + where;
        common_http_url parts;
        try {
            parts = common_http_parse_url(url);
        } catch (const std::exception & e) {
            throw std::invalid_argument(what + ": " + e.what());
        }
        if (!host_allowed(policy, parts.host, parts.port)) {
            std::string list;
            for (const auto & h : policy.hosts) {
                list += (list.empty() ? "" : ",") + h.host + (h.port == -1 ? "" : ":" + std::to_string(h.port));
            }
            throw std::invalid_argument(what + ": host " + parts.host + ":" + std::to_string(parts.port) +
                                        " is not in " + FLAG_MEDIA_HOSTS + " (" + list + ")");
        }
        std::optional<std::pair<httplib::Client, common_http_url>> client;
        try {
            client.emplace(common_http_client(url));
        } catch (const std::exception & e) {
            throw std::invalid_argument(what + ": " + e.what());
        }
        httplib::Client & cli = client->first;
        cli.set_follow_location(false);  // each hop is checked here
        set_timeout([&](time_t s, time_t us) { cli.set_connection_timeout(s, us); }, policy.connect_timeout_s);
        set_timeout([&](time_t s, time_t us) { cli.set_read_timeout(s, us); }, policy.read_timeout_s);
        set_timeout([&](time_t s, time_t us) { cli.set_write_timeout(s, us); }, policy.read_timeout_s);

        const auto deadline = std::chrono::steady_clock::now() +
            std::chrono::duration<double>(policy.connect_timeout_s + policy.read_timeout_s);
        std::string stop_reason;
        std::vector<uint8_t> body;
        httplib::Headers headers = { { "Accept", "image/*" }, { "User-Agent", "llama-server" } };
        auto res = cli.Get(parts.path, headers,
            [&](const httplib::Response & r) {
                const auto length = r.get_header_value("Content-Length");
                if (r.status == 200 && !length.empty() && std::all_of(length.begin(), length.end(), ::isdigit) &&
                    (length.size() > 18 || std::stoll(length) > policy.max_bytes)) {
                    stop_reason = too_large(policy, what, length).what();
                    return false;
                }
                return true;
            },
            [&](const char * data, size_t len) {
                if (std::chrono::steady_clock::now() > deadline) {
                    stop_reason = what + ": not received within the timeouts (" + FLAG_TIMEOUTS + ")";
                    return false;
                }
                body.insert(body.end(), data, data + len);
                if ((int64_t) body.size() > policy.max_bytes) {
                    stop_reason = too_large(policy, what, "more than " + std::to_string(policy.max_bytes)).what();
                    return false;
                }
                return true;
            });
        if (!stop_reason.empty()) {
            throw std::invalid_argument(stop_reason);
        }
        if (!res) {
            const auto err = res.error();
            const bool timed_out = err == httplib::Error::ConnectionTimeout || err == httplib::Error::Read;
            throw std::invalid_argument(what + ": cannot fetch it (" + httplib::to_string(err) + ")" +
                                        (timed_out ? std::string(" - timeouts: ") + FLAG_TIMEOUTS : ""));
        }
        const int status = res->status;
        if (status == 301 || status == 302 || status == 303 || status == 307 || status == 308) {
            const auto location = res->get_header_value("Location");
            if (location.empty()) {
                throw std::invalid_argument(what + ": HTTP " + std::to_string(status) + " without a Location");
            }
            url = resolve_location(parts, location);
            continue;
        }
        if (status != 200) {
            throw std::invalid_argument(what + ": the server answered HTTP " + std::to_string(status));
        }
        SRV_INF("downloaded %zu bytes from '%s'\n", body.size(), shown(url).c_str());
        return body;
    }
    throw std::invalid_argument("media URL '" + shown(original) + "': more than " + std::to_string(MAX_REDIRECTS) +
                                " redirects");
}

// --- images -------------------------------------------------------------------------------

static uint32_t be32(const uint8_t * p) { return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3]; }
static uint32_t be16(const uint8_t * p) { return (uint32_t) p[0] << 8 | p[1]; }
static uint32_t le16(const uint8_t * p) { return (uint32_t) p[1] << 8 | p[0]; }
static uint32_t le32(const uint8_t * p) { return (uint32_t) p[3] << 24 | (uint32_t) p[2] << 16 | (uint32_t) p[1] << 8 | p[0]; }

struct image_header {
    const char * format;
    int64_t width;
    int64_t height;
};

static std::invalid_argument corrupt(const char * format, const std::string & why) {
    return std::invalid_argument(std::string("the ") + format + " image is corrupt or truncated (" + why + ")");
}

// PNG: the signature, IHDR first, then chunks up to IEND
static image_header png_header(const std::vector<uint8_t> & d) {
    if (d.size() < 33 || be32(&d[8]) != 13 || memcmp(&d[12], "IHDR", 4) != 0) {
        throw corrupt("PNG", "no IHDR chunk");
    }
    size_t at = 8;
    while (true) {
        if (at + 12 > d.size()) {
            throw corrupt("PNG", "it ends before its IEND chunk");
        }
        const uint64_t len = be32(&d[at]);
        if (memcmp(&d[at + 4], "IEND", 4) == 0) {
            break;
        }
        at += 12 + len;
    }
    return { "PNG", be32(&d[16]), be32(&d[20]) };
}

// JPEG: markers from SOI; the frame header (SOFn) gives the size; entropy-coded data after
// each SOS runs to the next marker; the image must reach EOI
static image_header jpeg_header(const std::vector<uint8_t> & d) {
    image_header h = { "JPEG", 0, 0 };
    size_t at = 2;
    while (true) {
        while (at < d.size() && d[at] == 0xFF && at + 1 < d.size() && d[at + 1] == 0xFF) {
            at++;  // fill bytes
        }
        if (at + 2 > d.size()) {
            throw corrupt("JPEG", "it ends before its end-of-image marker");
        }
        if (d[at] != 0xFF) {
            throw corrupt("JPEG", "a marker was expected at byte " + std::to_string(at));
        }
        const uint8_t marker = d[at + 1];
        at += 2;
        if (marker == 0xD9) {
            break;  // EOI
        }
        if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) {
            continue;  // TEM, RSTn, SOI: no length
        }
        if (at + 2 > d.size()) {
            throw corrupt("JPEG", "it ends inside a marker segment");
        }
        const size_t len = be16(&d[at]);
        if (len < 2 || at + len > d.size()) {
            throw corrupt("JPEG", "it ends inside a marker segment");
        }
        const bool sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
        if (sof) {
            if (len < 7) {
                throw corrupt("JPEG", "short frame header");
            }
            h.height = be16(&d[at + 3]);
            h.width  = be16(&d[at + 5]);
        }
        at += len;
        if (marker == 0xDA) {  // SOS: skip the scan's data
            while (at + 1 < d.size() && !(d[at] == 0xFF && d[at + 1] != 0x00 && !(d[at + 1] >= 0xD0 && d[at + 1] <= 0xD7))) {
                at++;
            }
        }
    }
    if (h.width == 0) {
        throw corrupt("JPEG", "no frame header before its end-of-image marker");
    }
    return h;
}

static image_header gif_header(const std::vector<uint8_t> & d) {
    if (d.size() < 14 || d.back() != 0x3B) {
        throw corrupt("GIF", "no trailer");
    }
    return { "GIF", le16(&d[6]), le16(&d[8]) };
}

static image_header bmp_header(const std::vector<uint8_t> & d) {
    if (d.size() < 26 || le32(&d[10]) >= d.size()) {
        throw corrupt("BMP", "no pixel data");
    }
    const int64_t height = (int32_t) le32(&d[22]);
    return { "BMP", (int32_t) le32(&d[18]), height < 0 ? -height : height };
}

void server_media_check_image(const std::vector<uint8_t> & d, int64_t max_pixels) {
    image_header h;
    if (d.size() >= 8 && memcmp(d.data(), "\x89PNG\r\n\x1a\n", 8) == 0) {
        h = png_header(d);
    } else if (d.size() >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) {
        h = jpeg_header(d);
    } else if (d.size() >= 6 && (memcmp(d.data(), "GIF87a", 6) == 0 || memcmp(d.data(), "GIF89a", 6) == 0)) {
        h = gif_header(d);
    } else if (d.size() >= 2 && d[0] == 'B' && d[1] == 'M') {
        h = bmp_header(d);
    } else {
        throw std::invalid_argument("the data is not a JPEG, PNG, BMP or GIF image (" + std::to_string(d.size()) +
                                    " bytes)");
    }
    if (h.width <= 0 || h.height <= 0) {
        throw corrupt(h.format, "its size is " + std::to_string(h.width) + "x" + std::to_string(h.height));
    }
    if (h.width * h.height > max_pixels) {
        throw std::invalid_argument(std::string("the ") + h.format + " image is " + std::to_string(h.width) + "x" +
                                    std::to_string(h.height) + " = " + std::to_string(h.width * h.height) +
                                    " pixels, more than this server's limit of " + std::to_string(max_pixels) + " (" +
                                    FLAG_MAX_PIXELS + ")");
    }
}

// what miniaudio reads (WAV, MP3, FLAC): the one kind of file besides images libmtmd takes
static bool looks_like_audio(const std::vector<uint8_t> & d) {
    return (d.size() >= 12 && memcmp(d.data(), "RIFF", 4) == 0 && memcmp(&d[8], "WAVE", 4) == 0) ||
           (d.size() >= 3 && memcmp(d.data(), "ID3", 3) == 0) ||
           (d.size() >= 2 && d[0] == 0xFF && (d[1] & 0xE0) == 0xE0) ||
           (d.size() >= 4 && memcmp(d.data(), "fLaC", 4) == 0);
}

std::vector<uint8_t> server_media_load(const server_media_policy & policy, const std::string & url, bool is_image) {
    std::vector<uint8_t> data;
    if (starts_with_ci(url, "data:")) {
        data = load_data_uri(policy, url);
    } else if (starts_with_ci(url, "file:")) {
        if (!starts_with_ci(url, "file://")) {
            throw std::invalid_argument("media URL '" + shown(url) + "': a file: URL is file:///path");
        }
        data = load_local_file(policy, url);
    } else if (starts_with_ci(url, "http://") || starts_with_ci(url, "https://")) {
        data = fetch(policy, url);
    } else if (url.find("://") != std::string::npos || url.empty()) {
        throw std::invalid_argument("media URL '" + shown(url) + "': only data: URIs are accepted "
                                    "(data:image/png;base64,...); file: needs " + FLAG_LOCAL_MEDIA +
                                    ", http(s): needs " + FLAG_MEDIA_HOSTS);
    } else {
        data = decode_base64(policy, url, "the media data (neither a URL nor base64)");  // raw base64, as upstream takes it
    }
    if (data.empty()) {
        throw std::invalid_argument("media URL '" + shown(url) + "': no data");
    }
    if (is_image) {
        server_media_check_image(data, policy.max_pixels);
    }
    return data;
}

void server_media_check_count(const server_media_policy & policy, size_t n_files) {
    if ((int64_t) n_files > policy.max_files) {
        throw std::invalid_argument("the request has " + std::to_string(n_files) +
                                    " media files, more than this server's limit of " +
                                    std::to_string(policy.max_files) + " (" + FLAG_MAX_FILES + ")");
    }
}

void server_media_check_files(const server_media_policy & policy, const std::vector<std::vector<uint8_t>> & files) {
    server_media_check_count(policy, files.size());
    for (const auto & file : files) {
        if ((int64_t) file.size() > policy.max_bytes) {
            throw too_large(policy, "a media file", std::to_string(file.size()));
        }
        if (!looks_like_audio(file)) {
            server_media_check_image(file, policy.max_pixels);
        }
    }
}

void server_media_check_prompt(const common_json & prompt, const server_media_policy & policy) {
    if (prompt.is_array()) {
        for (const auto & p : prompt) {
            server_media_check_prompt(p, policy);
        }
        return;
    }
    if (!prompt.is_object() || !prompt.contains("multimodal_data")) {
        return;
    }
    std::vector<std::vector<uint8_t>> files;
    for (const auto & entry : prompt.at("multimodal_data")) {
        if (!entry.is_string()) {
            throw std::invalid_argument("multimodal_data entries must be base64 strings");
        }
        files.push_back(decode_base64(policy, entry.get<std::string>(), "a multimodal_data entry"));
    }
    server_media_check_files(policy, files);
}
